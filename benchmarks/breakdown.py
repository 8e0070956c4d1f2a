"""Where the time goes: a training step by op category (torch.profiler), and a basis update by stage (timers)."""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from typing import Callable
from unittest import mock

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import harness
from oialr.layers import LowRankConv, LowRankLinear
from oialr.layers.base import PATHS
from workloads import CONFIGS, WORKLOADS, Trainer, Workload

# Op categories by aten name (an op's self time; nested ops count in their own category). Ops run inside
# ``Optimizer.step`` count as "optimizer step" whatever their name.
OP_CATEGORIES = (
    ("matmul / conv", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                       "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
                       "aten::convolution", "aten::conv2d", "aten::_slow_conv2d_forward",
                       "aten::_slow_conv2d_backward", "aten::thnn_conv2d")),
    ("attention (SDPA fwd + bwd)", ("scaled_dot_product", "softmax")),
    ("GELU fwd + bwd", ("aten::gelu",)),
    ("LayerNorm / BatchNorm fwd + bwd", ("layer_norm", "batch_norm")),
    ("copies, cat, fills, allocation", ("aten::copy_", "aten::cat", "aten::_to_copy", "aten::clone",
                                        "aten::contiguous", "aten::fill_", "aten::zero_", "aten::empty",
                                        "aten::empty_strided", "aten::empty_like", "aten::zeros", "aten::zeros_like",
                                        "aten::constant_pad_nd")),
)
OPTIMIZER = "optimizer step (AdamW)"
OTHER = "other ops (elementwise, reductions, views, autograd bookkeeping)"
CATEGORIES = [name for name, _ in OP_CATEGORIES] + [OPTIMIZER, OTHER]


def op_category(event) -> str:
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return OPTIMIZER
        parent = parent.cpu_parent
    name = event.name
    for category, patterns in OP_CATEGORIES:
        if any(name == p or (not p.startswith("aten::") and p in name) or name.startswith(p + "_")
               for p in patterns):
            return category
    return OTHER


def step_profile(trainer: Trainer, steps: int = 3, warmup: int = 2) -> dict[str, float]:
    """Milliseconds per training step by op category (self CPU time of the ops on the calling thread, i.e. their
    wall time with the intra-op threads working inside), plus ``"wall"`` (the profiled steps' wall time; the
    profiler's own overhead is in it) and ``"outside ops"`` (wall minus the ops: Python, dispatch)."""
    for _ in range(warmup):
        trainer.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        wall = time.perf_counter() - start
    ms = defaultdict(float)
    for event in prof.events():
        ms[op_category(event)] += event.self_cpu_time_total / 1e3 / steps
    result = {name: ms[name] for name in CATEGORIES}
    result["wall"] = 1e3 * wall / steps
    result["outside ops"] = result["wall"] - sum(ms.values())
    return result


def step_profile_section(workload: Workload, configs: list[str], steps: int = 3) -> tuple[str, dict]:
    profiles = {name: step_profile(Trainer(workload, CONFIGS[name]), steps=steps) for name in configs}
    rows = [[category, *(f"{profiles[name][category]:.1f}" for name in configs)]
            for category in CATEGORIES + ["outside ops", "wall"]]
    rows[-2][0] = "outside ops (Python, dispatch, profiler overhead)"
    rows[-1][0] = "**wall (profiled)**"
    matmul = {name: profiles[name]["matmul / conv"] for name in configs}
    rest = {name: profiles[name]["wall"] - matmul[name] for name in configs}
    low = configs[-1]
    floor = (f"Matmuls and convolutions take {', '.join(f'{matmul[n]:.0f} ms ({n})' for n in configs)} per step; "
             f"everything else takes {', '.join(f'{rest[n]:.0f} ms' for n in configs)}, so at {low} the part that "
             f"does not shrink with the rank is {rest[low] / profiles[low]['wall']:.0%} of the step.")
    text = "\n".join([
        f"Profile of {workload.name} ({steps} steps per config after 2 warm-up steps, `torch.profiler`, CPU; "
        "self time of every op on the main thread, in ms per step; ops inside `Optimizer.step` counted as the "
        "optimizer):", "",
        harness.markdown_table(["category"] + configs, rows), "", floor, ""])
    return text, profiles


@contextlib.contextmanager
def stage_timers(stages: dict[str, float]):
    """Patch the library functions a basis update calls so that each adds its seconds to ``stages``."""
    def timed(key: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[key] += time.perf_counter() - start
        return wrapper

    import oialr.controller
    import oialr.layers.base
    import oialr.linalg
    import oialr.optim_state
    targets = {
        "basis_update": (oialr.controller, "basis_update"),
        "orthonormality check": (oialr.linalg, "orthonormality_error"),
        "re-orthonormalize (QR)": (oialr.linalg, "orthonormalize"),
        "SVD of Σ": (oialr.linalg, "svd"),
        "rank selection": (oialr.linalg, "select_rank"),
        "copy into the layer (set_factors)": (oialr.layers.base.LowRankLayer, "set_factors"),
        "optimizer-state rotation": (oialr.optim_state, "rotate"),
    }
    with contextlib.ExitStack() as stack:
        for key, (owner, attr) in targets.items():
            stack.enter_context(mock.patch.object(owner, attr, timed(key, getattr(owner, attr))))
        yield


UPDATE_STAGES = ["orthonormality check", "re-orthonormalize (QR)", "SVD of Σ", "rank selection",
                 "new factors U·u, V·v (float64) and casts", "copy into the layer (set_factors)",
                 "optimizer-state rotation", "other (finite check, loop)"]


def update_breakdown(trainer: Trainer, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per basis update (``controller._update_bases()``) by stage: one training step (so ``Σ`` has AdamW
    state to rotate), one untimed update, then the mean of ``repeats`` timed updates."""
    trainer.step()
    trainer.controller._update_bases()
    stages: dict[str, float] = defaultdict(float)
    with stage_timers(stages):
        start = time.perf_counter()
        for _ in range(repeats):
            trainer.controller._update_bases()
        total = time.perf_counter() - start
    inner = sum(stages[k] for k in ("orthonormality check", "re-orthonormalize (QR)", "SVD of Σ", "rank selection"))
    stages["new factors U·u, V·v (float64) and casts"] = stages.pop("basis_update") - inner
    stages["other (finite check, loop)"] = total - sum(stages.values())
    result = {k: 1e3 * stages[k] / repeats for k in UPDATE_STAGES}
    result["total"] = 1e3 * total / repeats
    return result


def update_section(cases: list[tuple[str, str]], repeats: int = 3) -> tuple[str, dict]:
    """Basis-update breakdown of (workload, config) pairs, as markdown."""
    results = {f"{w} {c}": update_breakdown(Trainer(WORKLOADS[w], CONFIGS[c]), repeats) for w, c in cases}
    names = list(results)
    rows = [[stage, *(f"{results[n][stage]:.1f} ({results[n][stage] / results[n]['total']:.0%})" for n in names)]
            for stage in UPDATE_STAGES]
    rows.append(["**total**", *(f"{results[n]['total']:.1f}" for n in names)])
    top = {n: sorted(UPDATE_STAGES, key=results[n].get, reverse=True)[:2] for n in names}
    summary = "Largest stages: " + "; ".join(
        f"{n}: {a} {results[n][a] / results[n]['total']:.0%}, {b} {results[n][b] / results[n]['total']:.0%}"
        for n, (a, b) in top.items()) + "."
    text = "\n".join([
        f"Basis update by stage (ms, mean of {repeats} updates after one training step and one untimed update; "
        "stages timed by wrapping the library functions `_update_bases` calls):", "",
        harness.markdown_table(["stage"] + names, rows), "", summary, ""])
    return text, results


def saved_tensors(layer, x, path: str) -> list[tuple[tuple[int, ...], int]]:
    """Shapes and bytes of the distinct non-parameter storages autograd saves in one forward of ``layer`` on ``x``
    with ``path`` forced."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, tuple[tuple[int, ...], int]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with mock.patch("oialr.layers.base.forward_path", return_value=path), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return list(saved.values())


def saved_section() -> str:
    """What autograd keeps for one factored layer on each path: a ViT MLP ``fc1`` (Linear 192 -> 768, rank 48, 128 ×
    17 tokens) and a ResNet ``layer1`` conv (64 -> 64, 3×3, rank 16, batch 32 at 28×28)."""
    torch.manual_seed(0)

    def factors(m: int, n: int, r: int):
        U, _ = torch.linalg.qr(torch.randn(m, r))
        V, _ = torch.linalg.qr(torch.randn(n, r))
        return U, torch.randn(r, r), V

    conv = nn.Conv2d(64, 64, 3, padding=1)
    cases = [
        ("LowRankLinear 192→768, r=48, x (128, 17, 192)",
         LowRankLinear(*factors(768, 192, 48), nn.Parameter(torch.zeros(768))),
         torch.randn(128, 17, 192, requires_grad=True)),
        ("LowRankConv 64→64 3×3, r=16, x (32, 64, 28, 28)",
         LowRankConv(*factors(64, 576, 16), conv.bias, conv), torch.randn(32, 64, 28, 28, requires_grad=True)),
    ]
    rows, notes = [], []
    for label, layer, x in cases:
        saved = {path: saved_tensors(layer, x, path) for path in PATHS}
        mib = {path: sum(b for _, b in items) / 2 ** 20 for path, items in saved.items()}
        for path, items in saved.items():
            rows.append([label, path, ", ".join("×".join(map(str, shape)) for shape, _ in items), f"{mib[path]:.1f}"])
        if isinstance(layer, LowRankConv) and tuple(x.shape) in [shape for shape, _ in saved["chain"]]:
            notes.append(f"The conv chain keeps the layer input `x` although the `Vᵀ` kernels applied to it are frozen "
                         f"(PyTorch's convolution saves its input for the backward whichever gradients are needed), "
                         f"and both r-channel intermediates: {mib['chain']:.1f} MiB vs {mib['dense']:.1f} MiB on "
                         f"the dense path.")
    return "\n".join([
        "Tensors autograd saves in one forward of a single factored layer, per forced path (parameters excluded; "
        "the input requires grad, as inside a network):", "",
        harness.markdown_table(["layer", "path", "saved tensors", "MiB"], rows), "", *notes, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(WORKLOADS), default="vit")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["full-rank", "f=0.25", "f=0.1"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    harness.setup_torch(args.threads)
    text, _ = step_profile_section(WORKLOADS[args.model], args.configs, steps=args.steps)
    print(text)
    print(saved_section())
    lowrank = [c for c in args.configs if CONFIGS[c].rank_fraction is not None]
    if lowrank:
        print(update_section([(args.model, c) for c in lowrank])[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
