"""What the ranks of finished ``oialr train`` runs allow end to end: the multiply-add ratio of each whole run.

A step's multiply-adds at given ranks come from :class:`flops.FlopModel` (Linear/Conv layers on the path the library
chooses, plus the attention products). For every epoch of a run, the ranks logged at its end (``metrics.jsonl``) price
its low-rank steps; steps before the transition count as full-rank. The run's ratio is the mean over its steps::

    bound = (1 / S) Σ_steps macs(ranks of the step) / macs(dense model)

Ranks only fall during the low-rank phase, so pricing an epoch at its final ranks undercounts: the run's true
multiply-add ratio is at least ``bound``. It is the wall-time ratio to full-rank of an implementation whose kernels
are equally efficient per multiply-add on both sides and whose other work is free. The rest of a step either does
not shrink with the rank (softmax, norms, activations, data) or shrinks with the trainable parameters (optimizer step,
gradient buffers); where the layers see many rows per batch (the mini-ViT: 2176) that rest is mostly the first kind
and measured ratios sit at or above ``bound``; where they see few (an MLP on a batch of 128) the dense weight
gradient and optimizer step cost more than their multiply-adds say, and OIALR can come in below it.

    .venv/bin/python benchmarks/e2e_bound.py --group FULL_RANK_RUN RUN [RUN ...] [--group ...] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from flops import FlopModel
from oialr.cli.models import build_model
from oialr.files import write_text

INPUT_SHAPES = {"fashion-mnist": (1, 28, 28), "mnist1d": (1, 40)}
NUM_CLASSES = 10


def load_results(run_dir: str) -> dict:
    """``results.json`` of a finished run."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a finished run folder: missing {path}")
    with open(path) as f:
        return json.load(f)


def load_epochs(run_dir: str) -> list[dict]:
    """The rows of ``metrics.jsonl`` of a run, one per epoch."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} has no per-epoch log: missing {path}")
    with open(path) as f:
        epochs = [json.loads(line) for line in f if line.strip()]
    if not epochs:
        raise ValueError(f"{path} has no epochs")
    return epochs


def flop_model(results: dict) -> FlopModel:
    """The dense model of a run's config traced on one batch of its input shape."""
    cfg = results["config"]
    if cfg["dataset"] not in INPUT_SHAPES:
        raise ValueError(f"dataset {cfg['dataset']!r} has no known input shape; add it to INPUT_SHAPES")
    shape = INPUT_SHAPES[cfg["dataset"]]
    torch.manual_seed(0)
    model = build_model(cfg["model"], shape, NUM_CLASSES, **cfg["model_args"])
    return FlopModel(model, torch.zeros(cfg["batch_size"], *shape))


def epoch_ratios(results: dict, epochs: list[dict], model: FlopModel) -> list[float]:
    """Per epoch: its steps' mean multiply-adds relative to the dense model (full-rank steps count 1)."""
    dense = model.macs_at({})
    oialr_run = results["method"] == "oialr"
    transition = results.get("transition_step")
    ratios, start = [], 0
    for row in epochs:
        end = row["step"]
        if not oialr_run or transition is None or transition >= end:
            ratios.append(1.0)
        else:
            full_steps = max(0, transition - start)
            low = model.macs_at(row["ranks"]) / dense
            ratios.append((full_steps + (end - start - full_steps) * low) / (end - start))
        start = end
    return ratios


def run_bound(epochs: list[dict], ratios: list[float]) -> float:
    """The step-weighted mean of the epoch ratios: the whole run's multiply-add ratio."""
    steps = [row["step"] - prev for row, prev in zip(epochs, [0] + [r["step"] for r in epochs[:-1]])]
    return sum(s * r for s, r in zip(steps, ratios)) / sum(steps)


def measure(groups: list[list[str]]) -> list[dict]:
    """Per OIALR run of every group (a full-rank run folder, then the OIALR run folders compared with it): its
    folder, top-1 and the group's full-rank top-1, the trainable share at the end, and the multiply-add ratio of
    the whole run (``bound``) and of its last epoch."""
    runs = []
    for baseline_dir, *run_dirs in groups:
        baseline = load_results(baseline_dir)
        if baseline["method"] != "full-rank":
            raise ValueError(f"--group starts with the full-rank run; {baseline_dir} is method {baseline['method']!r}")
        for run_dir in run_dirs:
            results, epochs = load_results(run_dir), load_epochs(run_dir)
            if results["model"] != baseline["model"]:
                raise ValueError(f"{run_dir} trains {results['model']!r}, its full-rank run {baseline_dir} trains "
                                 f"{baseline['model']!r}")
            ratios = epoch_ratios(results, epochs, flop_model(results))
            runs.append({"run": run_dir, "top1": results["top1"], "baseline_top1": baseline["top1"],
                         "trainable": results["trainable_params"] / results["dense_params"],
                         "bound": run_bound(epochs, ratios), "last_epoch": ratios[-1]})
    return runs


def render_table(runs: list[dict]) -> str:
    """:func:`measure`'s runs as a markdown table: per run its top-1 and gap to the group's full-rank run,
    trainable share, and the multiply-add ratio of the whole run and of its last epoch."""
    lines = ["| run | top-1 % | vs full-rank | trainable % | multiply-add ratio, whole run | "
             "multiply-add ratio, last epoch |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {100 * r['top1']:.2f} | {100 * (r['top1'] - r['baseline_top1']):+.2f} | "
              f"{100 * r['trainable']:.1f} | {r['bound']:.3f} | {r['last_epoch']:.3f} |" for r in runs]
    return "\n".join(lines) + "\n"


def table(groups: list[list[str]]) -> str:
    """:func:`measure` then :func:`render_table`."""
    return render_table(measure(groups))


PAGE = """# What the ranks allow end to end

Generated by

```
{command}
```

Per run: top-1 and its gap to the full-rank run of its group, the share of the dense parameters that trains at the
end, and the ratio of multiply-adds to a full-rank run of the same length, for the whole run and for its last epoch.
Steps before the transition count as full-rank; every low-rank epoch is priced at the ranks logged at its end (ranks
only fall, so this undercounts) on the path the library chooses per layer (Linear/Conv layers and attention products,
forward + backward; `benchmarks/flops.py`). This is the wall-time ratio of an implementation equally efficient per
multiply-add on both sides whose other work is free. Softmax, norms, activations and data do not shrink with the
rank (~25% of a full-rank mini-ViT step, docs/PERFORMANCE.md); the optimizer step and gradient buffers shrink with
the trainable parameters (~3% of a mini-ViT step, whose layers see 2176 rows per batch; far more in a wide MLP on a
batch of 128, whose dense weight gradients and optimizer step also cost more than their multiply-adds say).

{table}"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar="RUN",
                        help="a full-rank run folder, then the OIALR run folders compared with it")
    parser.add_argument("--out", help="write the page to this file (atomically) instead of printing the table")
    args = parser.parse_args(argv)
    text = table(args.group)
    if args.out:
        command = " ".join([".venv/bin/python benchmarks/e2e_bound.py"] + [
            f"--group {' '.join(group)}" for group in args.group] + [f"--out {args.out}"])
        write_text(args.out, PAGE.format(command=command, table=text))
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
