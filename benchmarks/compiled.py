"""Training-step time with and without ``torch.compile`` (inductor), full-rank and low-rank, as markdown."""
from __future__ import annotations

import argparse
import sys
import time

import torch

import harness
from workloads import CONFIGS, FULL_RANK, WORKLOADS, Trainer, Workload

DEFAULT_CONFIGS = (FULL_RANK, "f=0.25", "f=0.1")


def run(workload: Workload, configs: list[str], *, repeats: int, steps: int, warmup: int) -> tuple[str, dict]:
    """Eager and compiled trainers of every config, timed interleaved in this process; ratios compiled / eager
    per round, medians over rounds. Compile time = the first compiled step (forward and backward graphs)."""
    trainers, compile_seconds = {}, {}
    for name in configs:
        trainers[name] = Trainer(workload, CONFIGS[name])
        compiled = Trainer(workload, CONFIGS[name])
        compiled.model = torch.compile(compiled.model)
        start = time.perf_counter()
        compiled.step()
        compile_seconds[name] = time.perf_counter() - start
        trainers[f"{name} compiled"] = compiled
    load_before = harness.load()
    with harness.ForeignLoad() as other:
        samples = harness.interleaved({name: t.step for name, t in trainers.items()},
                                      repeats=repeats, calls=steps, warmup=warmup)
    rows, ratio = [], {}
    for name in configs:
        eager, comp = samples[name], samples[f"{name} compiled"]
        ratio[name] = harness.median([c / e for c, e in zip(comp, eager)])
        rows.append([name, f"{1e3 * harness.median(eager):.1f}", f"{1e3 * harness.median(comp):.1f}",
                     f"{ratio[name]:.3f}", f"{compile_seconds[name]:.0f}"])
    text = "\n".join([
        f"### torch.compile: {workload.name}", "",
        f"{repeats} interleaved rounds × {steps} steps per variant after {warmup} warm-up steps, "
        f"`torch.compile(model)` (inductor, default mode); the optimizer step stays eager. Load average "
        f"{load_before} before the timed loop; other processes kept {other.cores:.2f} cores busy on average during "
        "it.", "",
        harness.markdown_table(["config", "eager ms/step", "compiled ms/step", "compiled / eager",
                                "compile s (first step)"], rows), ""])
    return text, {"ratio": ratio, "compile_seconds": compile_seconds, "foreign_cores": other.cores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(WORKLOADS), default="vit")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(DEFAULT_CONFIGS))
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (medians over them)")
    p.add_argument("--steps", type=int, default=2, help="training steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    harness.setup_torch(args.threads)
    text, _ = run(WORKLOADS[args.model], args.configs, repeats=args.repeats, steps=args.steps, warmup=args.warmup)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
