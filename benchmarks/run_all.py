"""Run every benchmark and write docs/PERFORMANCE.md (atomically): machine, targets, per-workload tables, end to end."""
from __future__ import annotations

import argparse
import os
import sys
import time

import breakdown
import compiled
import end_to_end
import harness
import step_time
from workloads import FULL_RANK, REBUILD, WORKLOADS

from oialr import files

METHOD = """\
How to read these tables:
- **Step time**: one training step = `zero_grad`, forward, cross-entropy, backward, `AdamW.step()` on one fixed random
  batch. Every config has its own model (same seed) and optimizer in one process; the configs run interleaved (each
  round runs every config for a few steps, the order rotating), after untimed warm-up steps. "ms/step" is the median
  over rounds; "ratio" is the median over rounds of (config time / full-rank time in the same round), so a burst of
  load from another process moves single rounds, not the ratio. `OIALR.step()` is not called in the timed steps.
- **Configs**: `f=x` is the low-rank phase of OIALR converted with `OIALRConfig(warmup_steps=0, cutoff=0.0,
  rank_fraction=x)`: every converted layer has rank `ceil(x·min(m, n))`, the output layer stays dense, and each
  factored layer takes the path `oialr.layers.forward_path` chooses by forward + backward multiply-adds:
  *chain* (`h = x V`, `h Σᵀ`, `h Uᵀ`; for a conv: conv with the `Vᵀ` kernels, 1×1 conv `Σ`, 1×1 conv `U`),
  *merged* (`x (ΣVᵀ)ᵀ`, then `Uᵀ`) or *dense* (rebuild `W = UΣVᵀ`, then the dense op). `dense rebuild f=0.25` forces
  the path of the published OIALR code on every factored layer (`with oialr.force_path("dense"):` while the model
  runs).
- **Predicted ratio** comes from the multiply-add model in `benchmarks/flops.py`: per layer the cost of the path the
  library's own `forward_path` picks, forward + backward, plus the attention products; norms, activations, softmax and
  the optimizer are not counted. Where the measured ratio is above the predicted one, the uncounted work (which does
  not shrink with the rank) is the floor.
- **Memory**: one fresh process per config, started with glibc's `MALLOC_MMAP_THRESHOLD_=65536` (freed tensors go back
  to the OS at once). After one warm-up step (it creates the AdamW state) and `zero_grad(set_to_none=True)`, the
  kernel's peak-RSS mark is reset (`/proc/self/clear_refs`) and two steps run; "peak RSS increase" is `VmHWM` minus the
  RSS before them (gradients, activations, temporaries). **peak** = that + the bytes of all parameters (frozen `U`,
  `V` included) + the AdamW state. "saved activations" are the distinct storages autograd saves in one forward
  (`saved_tensors_hooks`, parameters excluded).
- **Basis update**: median time of `ctl.update_bases()` (SVD of every Σ in float64, rotation of the factors and of
  the AdamW moments) after the timed steps; share = time / (`update_every` × step time of the same config).
"""


def targets(vit: dict) -> str:
    """The targets table from the mini-ViT numbers."""
    ratio, samples, mem = vit["ratio"], vit["samples"], vit["memory"]
    speedup = harness.median([a / b for a, b in zip(samples[REBUILD], samples["f=0.25"])])
    worst = max(vit["update"], key=vit["update"].get)
    rows = [
        ["low-rank step / full-rank, f=0.25", f"{ratio['f=0.25']:.3f}", "≤ 0.55", ratio["f=0.25"] <= 0.55],
        ["low-rank step / full-rank, f=0.1", f"{ratio['f=0.1']:.3f}", "≤ 0.50", ratio["f=0.1"] <= 0.50],
        ["low-rank step / full-rank, f=1.0", f"{ratio['f=1.0']:.3f}", "≤ 1.05", ratio["f=1.0"] <= 1.05],
        ["speed-up over the dense-rebuild reference, f=0.25", f"{speedup:.2f}×", "≥ 1.7×", speedup >= 1.7],
        [f"one basis update / training time at update_every=100 (worst: {worst})",
         f"{100 * vit['update'][worst]:.2f}%", "< 2%", vit["update"][worst] < 0.02],
    ]
    if mem:
        peak = mem["f=0.25"]["peak"] / mem[FULL_RANK]["peak"]
        rows.append(["peak memory of a step / full-rank, f=0.25", f"{peak:.2f}", "≤ 0.8", peak <= 0.8])
    rows = [[what, value, goal, "met" if ok else "**missed**"] for what, value, goal, ok in rows]
    rows.append(["end to end, Fashion-MNIST mini-ViT: OIALR / full-rank wall time", "not part of this run: "
                 "from whole training runs, see docs/RESULTS.md (or `--e2e fmnist-vit`); the multiply-add floor of "
                 "their ranks: docs/results/e2e_bound.md (benchmarks/e2e_bound.py)", "≤ 0.7", "—"])
    return harness.markdown_table(["target (mini-ViT, batch 128)", "measured", "target", ""], rows)


WIDTHS = {"vit": 192, "block512": 512, "block1024": 1024}


def width_scaling(numbers: dict) -> str:
    """Measured (predicted) step ratio to full-rank per transformer width."""
    configs = [name for name in numbers[next(iter(numbers))]["ratio"] if name != FULL_RANK]
    rows = [[f"{name} (width {WIDTHS[name]})", f"{numbers[name]['step_ms'][FULL_RANK]:.0f}",
             *(f"{numbers[name]['ratio'][c]:.3f} ({numbers[name]['predicted'][c]:.3f})" for c in configs)]
            for name in WIDTHS if name in numbers]
    return "\n".join([
        "Step time relative to full-rank, measured (predicted by multiply-adds), for the transformer workloads:", "",
        harness.markdown_table(["workload", "full-rank ms/step"] + configs, rows), ""])


def activation_memory(numbers: dict) -> str:
    """Saved activations per config, from the memory probes."""
    mems = {name: n["memory"] for name, n in numbers.items() if n["memory"]}
    if not mems:
        return ""
    configs = list(next(iter(mems.values())))
    rows = [[name, *(f"{mem[c]['saved'] / 2 ** 20:.1f}" for c in configs)] for name, mem in mems.items()]
    notes = []
    for name, mem in mems.items():
        full = mem[FULL_RANK]["saved"]
        more = [c for c in configs if c != FULL_RANK and mem[c]["saved"] > full]
        if more:
            notes.append(f"- {name}: " + ", ".join(f"{c} saves {mem[c]['saved'] / full:.2f}×" for c in more)
                         + " the full-rank activations.")
    return "\n".join([
        "Activations autograd saves in one forward (MiB, from the memory probes):", "",
        harness.markdown_table(["workload"] + configs, rows), "",
        *(notes or ["No factored config saves more than full-rank."]), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds per workload")
    p.add_argument("--steps", type=int, default=2, help="training steps per config per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--e2e", nargs="*", choices=sorted(end_to_end.RECIPES), default=["mnist1d-cnn"],
                   help="end-to-end recipes (none: skip)")
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, help="epochs of the end-to-end runs (default: each recipe's own)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiles (where the time goes)")
    p.add_argument("--no-compile", action="store_true", help="skip eager vs torch.compile on the mini-ViT")
    p.add_argument("--out", default=os.path.join(end_to_end.repo_root(), "docs", "PERFORMANCE.md"))
    args = p.parse_args(argv)
    harness.setup_torch(args.threads)
    start = time.perf_counter()
    info = harness.machine_info()
    sections, numbers = [], {}
    for name in args.models:
        print(f"[{time.perf_counter() - start:6.0f}s] step time: {name}", flush=True)
        text, numbers[name] = step_time.run(WORKLOADS[name], repeats=args.repeats, steps=args.steps,
                                            warmup=args.warmup, threads=args.threads)
        sections.append(text)
    where = []
    if not args.no_profile:
        print(f"[{time.perf_counter() - start:6.0f}s] profiles", flush=True)
        profiles = breakdown.step_profiles(WORKLOADS["vit"], [FULL_RANK, "f=0.25", "f=0.1"])
        updates = breakdown.update_breakdowns([("vit", "f=1.0"), ("vit", "f=0.25"), ("block1024", "f=1.0")])
        where = ["## Where the time goes", "", breakdown.profile_text(WORKLOADS["vit"], profiles),
                 breakdown.update_text(updates), breakdown.saved_text(breakdown.saved_cases()),
                 activation_memory(numbers)]
    if not args.no_compile:
        print(f"[{time.perf_counter() - start:6.0f}s] torch.compile", flush=True)
        text, _ = compiled.run(WORKLOADS["vit"], list(compiled.DEFAULT_CONFIGS), repeats=args.repeats,
                               steps=args.steps, warmup=args.warmup)
        sections.append(text)
    for name in args.e2e:
        print(f"[{time.perf_counter() - start:6.0f}s] end to end: {name}", flush=True)
        recipe = end_to_end.RECIPES[name]
        text, _ = end_to_end.run(recipe, repeats=args.e2e_repeats, epochs=args.epochs or recipe.epochs,
                                 threads=args.threads)
        sections.append(text)
    info["load average (1/5/15 min) at the end"] = harness.load()
    info["wall time of the whole run"] = f"{(time.perf_counter() - start) / 60:.1f} min"
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    doc = ["# Performance", "",
           "Generated by `benchmarks/run_all.py`; every number below comes from one run of it on the machine "
           "described. Timings are ratios measured in one process, interleaved, median of several rounds.", "",
           "```", f".venv/bin/python benchmarks/run_all.py {argv_text}".rstrip(), "```", "",
           "Single pieces: `.venv/bin/python benchmarks/step_time.py --model vit|resnet18|block512|block1024 "
           "--repeats N --threads 2 [--device cuda]`, `.venv/bin/python benchmarks/breakdown.py --model vit "
           "--configs full-rank "
           "f=0.25` (profile, basis-update stages, saved tensors) and `.venv/bin/python benchmarks/end_to_end.py "
           "--e2e mnist1d-cnn|fmnist-vit --repeats N --epochs N` (the Fashion-MNIST mini-ViT comparison is long "
           "and not part of the default run), `.venv/bin/python benchmarks/compiled.py --model vit` (eager vs "
           "torch.compile). On a lent GPU machine, `bash benchmarks/gpu_check.sh` runs the CUDA tests and the "
           "step-time harness on the GPU in one command.",
           "", "## Machine", "", *(f"- {k}: {v}" for k, v in info.items()), ""]
    if "vit" in numbers:
        doc += ["## Targets", "", targets(numbers["vit"]), ""]
    if any(name in numbers for name in WIDTHS):
        doc += ["## Width scaling", "", width_scaling({k: v for k, v in numbers.items() if k in WIDTHS})]
    doc += [*where, "## Method", "", METHOD, "## Results", "", *sections]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    files.write_text(args.out, "\n".join(doc).rstrip() + "\n")
    print(f"[{time.perf_counter() - start:6.0f}s] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
