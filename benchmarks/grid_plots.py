"""The two figures of a language-model grid's page: validation bits per byte against training seconds (every run on
one chart), and final val bpb against the stored fraction of the factored layers (full-rank as a line)."""
from __future__ import annotations

import json
import os

from oialr.cli.compare import factored_stored_fraction, load_results
from oialr.cli.plots import save_figure


def bpb_curves(groups: dict[str, list[str]]) -> dict[str, list[tuple[list[float], list[float]]]]:
    """Per group, per run: (training seconds, val bpb) at every evaluation of ``metrics.jsonl``."""
    curves = {}
    for group, run_dirs in groups.items():
        for run_dir in run_dirs:
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            curves.setdefault(group, []).append(([r["train_seconds"] for r in rows], [r["val_bpb"] for r in rows]))
    return curves


def bpb_by_stored(groups: dict[str, list[str]]) -> dict[str, list[tuple[float | None, float]]]:
    """Per group, per run: (stored fraction of the factored layers or None, final val bpb)."""
    return {group: [(factored_stored_fraction(r), r["val_bpb"]) for r in map(load_results, run_dirs)]
            for group, run_dirs in groups.items()}


def render(curves: dict, points: dict, folder: str) -> list[str]:
    """Write ``bpb_vs_time.png`` and ``bpb_vs_stored.png`` to ``folder``; return their paths (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20").colors
    color = {group: colors[i % len(colors)] for i, group in enumerate(curves)}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for group, runs in curves.items():
        for i, (seconds, bpb) in enumerate(runs):
            ax.plot(seconds, bpb, marker=".", lw=1, color=color[group], label=group if i == 0 else None)
    ax.set(xlabel="training seconds (evaluation excluded)", ylabel="validation bits per byte",
           title="validation bpb against wall-clock time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    paths = [save_figure(fig, os.path.join(folder, "bpb_vs_time.png"))]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for group, runs in points.items():
        dense = [bpb for stored, bpb in runs if stored is None]
        if dense:
            ax.axhline(sum(dense) / len(dense), color=color.get(group), ls="--", lw=1,
                       label=f"{group} (no factored layer)")
        factored = [(stored, bpb) for stored, bpb in runs if stored is not None]
        if factored:
            ax.scatter(*zip(*factored), color=color.get(group), label=group)
    ax.set(xlabel="stored parameters of the factored layers / the dense weights they replace",
           ylabel="final validation bits per byte", title="validation bpb against stored parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    paths.append(save_figure(fig, os.path.join(folder, "bpb_vs_stored.png")))
    return paths
