"""Memory the transition needs on top of the full-rank training state: the peak RSS increase while
``OIALR.step()`` converts every layer, after two AdamW steps (so the dense weights have optimizer state).

    MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python benchmarks/transition_memory.py --width 2048 --depth 3

The model is the CLI's MLP on Fashion-MNIST-shaped input (784 -> depth × width -> 10), batch 128, one thread.
``MALLOC_MMAP_THRESHOLD_`` makes glibc return freed tensors to the OS at once, so RSS follows live memory.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import harness
import oialr
from oialr.cli.models import build_model


def measure(width: int, depth: int, cutoff: float) -> dict:
    """MiB of the dense parameters, the peak RSS increase during the transition and the RSS change it leaves,
    and the singular values kept, for the MLP of ``depth`` × ``width``."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10, width=width, depth=depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = oialr.OIALR(model, opt, oialr.OIALRConfig(warmup_steps=2, cutoff=cutoff))
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    for step in (1, 2):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step == 1:
            ctl.step()                                  # step 2's ctl.step() below is the transition
    opt.zero_grad(set_to_none=True)
    dense_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    before = harness.status_kib("VmRSS")
    peak = harness.peak_rss_delta(ctl.step) / 2**20
    if ctl.phase != "low-rank":
        raise RuntimeError(f"the transition did not happen at step 2 (phase {ctl.phase!r})")
    return {"width": width, "depth": depth, "cutoff": cutoff, "dense_mb": dense_mb, "peak_mb": peak,
            "after_mb": (harness.status_kib("VmRSS") - before) / 1024,
            "kept": sum(layer.rank for layer in ctl.lowrank_layers().values())}


def render(numbers: dict) -> str:
    return (f"mlp {numbers['depth']} x {numbers['width']}: parameters {numbers['dense_mb']:.1f} MiB (AdamW state "
            f"twice that); transition peak RSS +{numbers['peak_mb']:.0f} MiB, after it {numbers['after_mb']:+.0f} "
            f"MiB (cutoff {numbers['cutoff']}, {numbers['kept']} singular values kept)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--cutoff", type=float, default=0.0, help="OIALR cutoff (0 keeps every singular value)")
    args = parser.parse_args(argv)
    harness.setup_torch(1)
    print(render(measure(args.width, args.depth, args.cutoff)))


if __name__ == "__main__":
    main()
