"""The two figures of a grid's page: its metric (validation bits per byte for language models, else test top-1)
against training seconds (every run on one chart), and the final metric against the stored fraction of the factored
layers (the accuracy–size frontier: the grid's ``curves`` as lines, other groups as points, groups with no factored
layer as horizontal lines)."""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

from oialr.cli.compare import factored_stored_fraction, load_results
from oialr.cli.plots import save_figure


@dataclass(frozen=True)
class Metric:
    """What a grid's figures plot: ``results.json[final] * scale`` at the end, ``metrics.jsonl[row] * scale`` per
    evaluation; files are named ``{short}_vs_time.png`` and ``{short}_vs_stored.png``."""
    final: str
    row: str
    scale: float
    short: str
    label: str
    title: str


VAL_BPB = Metric("val_bpb", "val_bpb", 1.0, "bpb", "validation bits per byte (lower is better)", "validation bpb")
TOP1 = Metric("top1", "test_top1", 100.0, "top1", "test top-1 accuracy, % (higher is better)", "test top-1")


def metric_of(results: list[dict]) -> Metric:
    """Validation bits per byte when any run has it (language models), else test top-1."""
    return VAL_BPB if any(r.get("val_bpb") is not None for r in results) else TOP1


@dataclass(frozen=True)
class Point:
    """One group on the stored-fraction figure: means over its runs, standard deviations with two runs or more."""
    group: str
    stored: float                  # % of the dense weights the factored layers replace
    value: float
    stored_std: float | None
    value_std: float | None


@dataclass(frozen=True)
class Frontier:
    """What the stored-fraction figure draws: each curve's points by stored fraction, the groups in no curve, and the
    mean of each group without a factored layer (a horizontal line)."""
    lines: dict[str, list[Point]]
    points: list[Point]
    levels: dict[str, float]


def metric_curves(groups: dict[str, list[str]], metric: Metric) -> tuple[dict, list[str]]:
    """Per group, per run: (training seconds, metric) at every evaluation of ``metrics.jsonl``; and the runs left
    out (no ``metrics.jsonl``)."""
    curves, left_out = {}, []
    for group, run_dirs in groups.items():
        for run_dir in run_dirs:
            path = os.path.join(run_dir, "metrics.jsonl")
            if not os.path.exists(path):
                left_out.append(f"{os.path.basename(run_dir)} (no metrics.jsonl)")
                continue
            with open(path) as f:
                rows = [row for row in map(json.loads, filter(str.strip, f)) if row.get(metric.row) is not None]
            curves.setdefault(group, []).append(([r["train_seconds"] for r in rows],
                                                 [metric.scale * r[metric.row] for r in rows]))
    return curves, left_out


def metric_by_stored(groups: dict[str, list[str]], metric: Metric) -> tuple[dict, list[str]]:
    """Per group, per run: (factored stored %, or None without a factored layer; final metric); and the runs left
    out (factored, but their ``results.json`` has no per-layer sizes, e.g. one rebuilt from a table)."""
    points, left_out = {}, []
    for group, run_dirs in groups.items():
        for run_dir in run_dirs:
            r = load_results(run_dir)
            if r.get("transition_step") is not None and not r.get("layers"):
                left_out.append(f"{os.path.basename(run_dir)} (no per-layer sizes in results.json)")
                continue
            stored = factored_stored_fraction(r)
            points.setdefault(group, []).append((None if stored is None else 100 * stored,
                                                 metric.scale * r[metric.final]))
    return points, left_out


def frontier(points: dict[str, list[tuple[float | None, float]]], curves: dict[str, list[str]]) -> Frontier:
    """Group the runs of :func:`metric_by_stored` into what the figure draws: a group whose runs all lack a factored
    layer is a level (mean); any other is a point (means ± stds over its factored runs), on the line of each curve
    naming it (sorted by stored %) or on its own."""
    levels = {g: statistics.mean(v for _, v in runs) for g, runs in points.items()
              if all(s is None for s, _ in runs)}
    summary = {g: _point(g, [(s, v) for s, v in runs if s is not None]) for g, runs in points.items()
               if g not in levels}
    lines = {label: sorted((summary[g] for g in groups if g in summary), key=lambda p: p.stored)
             for label, groups in curves.items()}
    in_curves = {g for groups in curves.values() for g in groups}
    return Frontier({label: line for label, line in lines.items() if line},
                    [p for g, p in summary.items() if g not in in_curves], levels)


def _point(group: str, runs: list[tuple[float, float]]) -> Point:
    stored, values = [s for s, _ in runs], [v for _, v in runs]
    spread = len(runs) >= 2
    return Point(group, statistics.mean(stored), statistics.mean(values),
                 statistics.stdev(stored) if spread else None, statistics.stdev(values) if spread else None)


def render(metric: Metric, curves: dict, front: Frontier, folder: str) -> list[str]:
    """Write ``{short}_vs_time.png`` (``curves`` of :func:`metric_curves`) and ``{short}_vs_stored.png`` (``front``)
    to ``folder``; return their paths (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors      # distinct colours while they last
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for k, (group, runs) in enumerate(curves.items()):
        for i, (seconds, values) in enumerate(runs):
            ax.plot(seconds, values, marker=".", lw=1, color=colors[k % len(colors)], label=group if i == 0 else None)
    ax.set(xlabel="training seconds (evaluation excluded)", ylabel=metric.label,
           title=f"{metric.title} against training time")
    _finish(ax)
    paths = [save_figure(fig, os.path.join(folder, f"{metric.short}_vs_time.png"))]

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP*X<>"
    for k, (label, line) in enumerate(front.lines.items()):
        ax.errorbar([p.stored for p in line], [p.value for p in line], xerr=_errors(line, "stored_std"),
                    yerr=_errors(line, "value_std"), color=colors[k % 10], marker=markers[k % 10], capsize=3,
                    label=label)
    for k, p in enumerate(front.points, start=len(front.lines)):
        ax.errorbar([p.stored], [p.value], xerr=_errors([p], "stored_std"), yerr=_errors([p], "value_std"),
                    color=colors[k % 10], marker=markers[k % 10], ls="none", capsize=3, label=p.group)
    for p in [p for line in front.lines.values() for p in line] + front.points:
        ax.annotate(p.group, (p.stored, p.value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for k, (group, value) in enumerate(front.levels.items(), start=len(front.lines) + len(front.points)):
        ax.axhline(value, color=colors[k % 10], ls="--", lw=1, label=f"{group} (no factored layer)")
        ax.annotate(group, (0.0, value), xycoords=("axes fraction", "data"), textcoords="offset points",
                    xytext=(4, 3), fontsize=7, color=colors[k % 10])
    ax.margins(0.08)                                                     # room for the points' names
    ax.set(xlabel="stored parameters of the factored layers, % of the dense weights they replace",
           ylabel=f"final {metric.label}", title=f"{metric.title} against stored parameters")
    _finish(ax)
    paths.append(save_figure(fig, os.path.join(folder, f"{metric.short}_vs_stored.png")))
    return paths


def _errors(points: list[Point], field: str) -> list[float] | None:
    """The ± std of ``points`` for matplotlib (0 for a group of one run), or None when no group has two runs."""
    stds = [getattr(p, field) for p in points]
    return None if all(s is None for s in stds) else [s or 0.0 for s in stds]


def _finish(ax) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
