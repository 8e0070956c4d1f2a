"""Training-step time with and without ``torch.compile`` (inductor), full-rank and low-rank, as markdown."""
from __future__ import annotations

import argparse
import sys
import time

import torch

import harness
from workloads import CONFIGS, FULL_RANK, WORKLOADS, Trainer, Workload

DEFAULT_CONFIGS = (FULL_RANK, "f=0.25", "f=0.1")


def measure(workload: Workload, configs: list[str], *, repeats: int, steps: int, warmup: int) -> dict:
    """Eager and compiled trainers of every config, timed interleaved in this process; ratios compiled / eager
    per round, medians over rounds. Compile time = the first compiled step (forward and backward graphs). Returns
    plain data: the samples (seconds per step, one per round) of ``name`` and ``"name compiled"``, the ratios,
    the compile seconds and the load around the timed loop."""
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
    ratio = {name: harness.median([c / e for c, e in zip(samples[f"{name} compiled"], samples[name])])
             for name in configs}
    return {"workload": workload.name, "configs": list(configs), "repeats": repeats, "steps": steps,
            "warmup": warmup, "load_before": load_before, "foreign_cores": other.cores, "samples": samples,
            "ratio": ratio, "compile_seconds": compile_seconds}


def render(numbers: dict) -> str:
    """:func:`measure`'s numbers as a markdown section."""
    samples = numbers["samples"]
    rows = [[name, f"{1e3 * harness.median(samples[name]):.1f}",
             f"{1e3 * harness.median(samples[f'{name} compiled']):.1f}", f"{numbers['ratio'][name]:.3f}",
             f"{numbers['compile_seconds'][name]:.0f}"] for name in numbers["configs"]]
    return "\n".join([
        f"### torch.compile: {numbers['workload']}", "",
        f"{numbers['repeats']} interleaved rounds × {numbers['steps']} steps per variant after {numbers['warmup']} "
        f"warm-up steps, `torch.compile(model)` (inductor, default mode); the optimizer step stays eager. Load "
        f"average {numbers['load_before']} before the timed loop; other processes kept "
        f"{numbers['foreign_cores']:.2f} cores busy on average during it.", "",
        harness.markdown_table(["config", "eager ms/step", "compiled ms/step", "compiled / eager",
                                "compile s (first step)"], rows), ""])


def run(workload: Workload, configs: list[str], *, repeats: int, steps: int, warmup: int) -> tuple[str, dict]:
    """:func:`measure` then :func:`render`: the markdown section and the numbers."""
    numbers = measure(workload, configs, repeats=repeats, steps=steps, warmup=warmup)
    return render(numbers), numbers


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
