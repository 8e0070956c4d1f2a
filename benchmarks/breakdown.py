"""Where the time goes: a training step by op category (torch.profiler), a basis update by stage (timers), and
what autograd saves per forward path."""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from typing import Callable, Iterator

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import harness
import oialr
from oialr import linalg, optim_state
from oialr.layers import PATHS, LowRankConv, LowRankLinear
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


def step_profiles(workload: Workload, configs: list[str], steps: int = 3) -> dict[str, dict[str, float]]:
    """:func:`step_profile` of every config, each on its own trainer."""
    return {name: step_profile(Trainer(workload, CONFIGS[name]), steps=steps) for name in configs}


def profile_text(workload: Workload, profiles: dict[str, dict[str, float]], steps: int = 3) -> str:
    """:func:`step_profiles` as markdown: the table by category and where the floor of the step lies."""
    configs = list(profiles)
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
    return "\n".join([
        f"Profile of {workload.name} ({steps} steps per config after 2 warm-up steps, `torch.profiler`, CPU; "
        "self time of every op on the main thread, in ms per step; ops inside `Optimizer.step` counted as the "
        "optimizer):", "",
        harness.markdown_table(["category"] + configs, rows), "", floor, ""])


UPDATE_STAGES = ["finite check of Σ", "orthonormality check", "re-orthonormalize (QR)", "SVD of Σ", "rank selection",
                 "new factors U·u, V·v (float64) and casts", "copy into the layer (set_factors)",
                 "optimizer-state rotation"]


class StageTimer:
    """``with timer("SVD of Σ"): ...`` adds the block's seconds to ``timer.seconds["SVD of Σ"]``; ``sync`` waits for
    queued device work before each clock read."""

    def __init__(self, sync: Callable[[], None] = lambda: None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[stage] += time.perf_counter() - start


@torch.no_grad()
def staged_update(ctl: oialr.OIALR, stage: StageTimer) -> None:
    """The basis update of every factored layer of ``ctl``, written out from the public functions it is made of and
    timed stage by stage (one process; the same work as ``ctl.update_bases()``, see
    :func:`oialr.factorize.basis_update`): skip a non-finite ``Σ``; ``U, Σ, V`` to float64; re-orthonormalize a
    drifted ``U`` or ``V`` (:func:`oialr.linalg.orthonormality_error`, :func:`oialr.linalg.orthonormalize`);
    ``Σ = u diag(s) vᵀ`` (:func:`oialr.linalg.svd`); keep ``k`` values (:func:`oialr.linalg.select_rank`);
    ``U u[:, :k]``, ``diag(s[:k])``, ``V v[:, :k]`` into the layer (``set_factors``); rotate ``Σ``'s optimizer
    state (:func:`oialr.optim_state.rotate`)."""
    config = ctl.config
    for layer in ctl.lowrank_layers().values():
        with stage("finite check of Σ"):
            finite = bool(torch.isfinite(layer.lowrank_S).all())
        if not finite:
            continue
        U, S, V = layer.lowrank_U, layer.lowrank_S, layer.lowrank_V
        with stage("new factors U·u, V·v (float64) and casts"):
            U64, S64, V64 = U.double(), S.double(), V.double()
        tol = max(linalg.ORTHONORMALITY_TOL, 10 * torch.finfo(U.dtype).eps)
        with stage("orthonormality check"):
            drifted_U, drifted_V = linalg.orthonormality_error(U64) > tol, linalg.orthonormality_error(V64) > tol
        with stage("re-orthonormalize (QR)"):
            if drifted_U:
                U64, R = linalg.orthonormalize(U64)
                S64 = R @ S64
            if drifted_V:
                V64, R = linalg.orthonormalize(V64)
                S64 = S64 @ R.mT
        with stage("SVD of Σ"):
            u, s, v = linalg.svd(S64)
        r = S.shape[0]
        with stage("rank selection"):
            k = linalg.select_rank(s, cutoff=config.cutoff, max_rank=r, min_rank=config.min_rank,
                                   current_rank=r, max_drop_fraction=config.max_drop_fraction)
        with stage("new factors U·u, V·v (float64) and casts"):
            factors = U64 @ u[:, :k], torch.diag(s[:k]), V64 @ v[:, :k]
        old_S = layer.lowrank_S
        with stage("copy into the layer (set_factors)"):
            layer.set_factors(*factors)
        with stage("optimizer-state rotation"):
            optim_state.rotate(ctl.optimizer, old_S, layer.lowrank_S, u, v)


def update_breakdown(trainer: Trainer, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per basis update by stage (:func:`staged_update`), their sum (``"sum of stages"``) and a real
    ``controller.update_bases()`` timed the same way (``"update_bases()"``): one training step (so ``Σ`` has AdamW
    state to rotate), one untimed update of each kind, then the mean of ``repeats`` timed updates of each, the two
    alternating (their order swapped every round)."""
    ctl = trainer.controller
    trainer.step()
    ctl.update_bases()
    staged_update(ctl, StageTimer())
    timer, real = StageTimer(), 0.0
    for i in range(repeats):
        for kind in (("staged", "real") if i % 2 == 0 else ("real", "staged")):
            if kind == "staged":
                staged_update(ctl, timer)
            else:
                start = time.perf_counter()
                ctl.update_bases()
                real += time.perf_counter() - start
    result = {k: 1e3 * timer.seconds[k] / repeats for k in UPDATE_STAGES}
    result["sum of stages"] = sum(result.values())
    result["update_bases()"] = 1e3 * real / repeats
    return result


def update_breakdowns(cases: list[tuple[str, str]], repeats: int = 3) -> dict[str, dict[str, float]]:
    """:func:`update_breakdown` of (workload, config) pairs, keyed ``"workload config"``."""
    return {f"{w} {c}": update_breakdown(Trainer(WORKLOADS[w], CONFIGS[c]), repeats) for w, c in cases}


def update_text(results: dict[str, dict[str, float]], repeats: int = 3) -> str:
    """:func:`update_breakdowns` as markdown: stages (share of their sum), the sum, the real update, the largest."""
    names = list(results)
    rows = [[stage, *(f"{results[n][stage]:.1f} ({results[n][stage] / results[n]['sum of stages']:.0%})"
                      for n in names)] for stage in UPDATE_STAGES]
    rows.append(["**sum of stages**", *(f"{results[n]['sum of stages']:.1f}" for n in names)])
    rows.append(["**`update_bases()`**", *(f"{results[n]['update_bases()']:.1f} "
                                           f"({results[n]['update_bases()'] / results[n]['sum of stages'] - 1:+.0%})"
                                           for n in names)])
    top = {n: sorted(UPDATE_STAGES, key=results[n].get, reverse=True)[:2] for n in names}
    summary = "Largest stages: " + "; ".join(
        f"{n}: {a} {results[n][a] / results[n]['sum of stages']:.0%}, "
        f"{b} {results[n][b] / results[n]['sum of stages']:.0%}" for n, (a, b) in top.items()) + "."
    return "\n".join([
        f"Basis update by stage (ms, mean of {repeats} updates after one training step and one untimed update; the "
        "stages are the public functions `update_bases()` is made of, called one after the other on each layer's "
        "tensors; the last row is `update_bases()` itself, timed the same way, alternating with the staged "
        "updates, and its difference to the sum of the stages):", "",
        harness.markdown_table(["stage"] + names, rows), "", summary, ""])


def saved_tensors(layer, x, path: str) -> list[tuple[tuple[int, ...], int]]:
    """Shapes and bytes of the distinct non-parameter storages autograd saves in one forward of ``layer`` on ``x``
    with ``path`` forced (:func:`oialr.force_path`)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, tuple[tuple[int, ...], int]] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with oialr.force_path(path), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return list(saved.values())


def saved_cases() -> list[dict]:
    """What autograd keeps for one factored layer on each path (:func:`saved_tensors` per path in ``"saved"``): a
    ViT MLP ``fc1`` (Linear 192 -> 768, rank 48, 128 × 17 tokens) and a ResNet ``layer1`` conv (64 -> 64, 3×3,
    rank 16, batch 32 at 28×28)."""
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
    return [{"label": label, "conv": isinstance(layer, LowRankConv), "input_shape": tuple(x.shape),
             "saved": {path: saved_tensors(layer, x, path) for path in PATHS}} for label, layer, x in cases]


def saved_text(cases: list[dict]) -> str:
    """:func:`saved_cases` as markdown: the tensors and MiB per path, and a note where a conv chain keeps ``x``."""
    rows, notes = [], []
    for case in cases:
        saved = case["saved"]
        mib = {path: sum(b for _, b in items) / 2 ** 20 for path, items in saved.items()}
        for path, items in saved.items():
            rows.append([case["label"], path, ", ".join("×".join(map(str, shape)) for shape, _ in items),
                         f"{mib[path]:.1f}"])
        if case["conv"] and case["input_shape"] in [shape for shape, _ in saved["chain"]]:
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
    workload = WORKLOADS[args.model]
    print(profile_text(workload, step_profiles(workload, args.configs, steps=args.steps), steps=args.steps))
    print(saved_text(saved_cases()))
    lowrank = [c for c in args.configs if CONFIGS[c].rank_fraction is not None]
    if lowrank:
        print(update_text(update_breakdowns([(args.model, c) for c in lowrank])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
