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


def measure(model_name: str, *, repeats: int) -> dict:
    """Median seconds of a training step and of one tracker sample (interleaved, ``repeats`` rounds after one
    untimed call each), with the batch, the number of tracked layers, the threads and the load."""
    torch.manual_seed(0)
    options, batch = MODELS[model_name]
    model = build_model(model_name, (1, 28, 28), 10, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    tracker = StabilityTracker(model, every=1, cutoff=0.15, mixing=True, lag=10)     # as `oialr train` samples

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    samples = harness.interleaved({"step": step, "sample": tracker.sample}, repeats=repeats, calls=1, warmup=1)
    return {"model": model_name, "batch": batch, "layers": len(tracker.layers), "threads": torch.get_num_threads(),
            "load": harness.load(), "repeats": repeats, "step_s": harness.median(samples["step"]),
            "sample_s": harness.median(samples["sample"])}


def render(numbers: dict, every: list[int]) -> str:
    """:func:`measure`'s numbers and the share of training time a sample takes at each interval in ``every``."""
    step_s, sample_s = numbers["step_s"], numbers["sample_s"]
    lines = [f"{numbers['model']}, batch {numbers['batch']}, {numbers['layers']} layers, {numbers['threads']} "
             f"threads, load {numbers['load']}: step {1e3 * step_s:.0f} ms, sample {1e3 * sample_s:.0f} ms (medians "
             f"of {numbers['repeats']})"]
    lines += [f"  every={e}: {sample_s / (e * step_s + sample_s):.1%} of training time" for e in every]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    p.add_argument("--every", type=int, nargs="+", default=[20, 50])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    harness.setup_torch(args.threads)
    print(render(measure(args.model, repeats=args.repeats), args.every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
