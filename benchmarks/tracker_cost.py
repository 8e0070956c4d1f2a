"""Cost of one StabilityTracker sample against a training step (interleaved, medians), as the share of training time
at a given sampling interval: ``sample / (every · step + sample)``."""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import harness
from oialr import StabilityTracker
from oialr.cli.models import build_model

MODELS = {   # name: (builder options, batch) as in configs/
    "vit": ({}, 128),
    "resnet18": ({"small_stem": False}, 128),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    p.add_argument("--every", type=int, nargs="+", default=[20, 50])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    harness.setup_torch(args.threads)
    torch.manual_seed(0)
    options, batch = MODELS[args.model]
    model = build_model(args.model, (1, 28, 28), 10, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    tracker = StabilityTracker(model, every=1, cutoff=0.15, mixing=True, lag=10)     # as `oialr train` samples

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    samples = harness.interleaved({"step": step, "sample": tracker.sample}, repeats=args.repeats, calls=1, warmup=1)
    step_s, sample_s = harness.median(samples["step"]), harness.median(samples["sample"])
    print(f"{args.model}, batch {batch}, {len(tracker.layers)} layers, {args.threads} threads, load {harness.load()}: "
          f"step {1e3 * step_s:.0f} ms, sample {1e3 * sample_s:.0f} ms (medians of {args.repeats})")
    for every in args.every:
        print(f"  every={every}: {sample_s / (every * step_s + sample_s):.1%} of training time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
