"""PNG plots of a run: learning curves, and ranks and parameter fractions over training."""
from __future__ import annotations

import os

from .. import files


def plot_run(metrics: list[dict], out: str) -> list[str]:
    """Write ``curves.png`` (loss and top-1 by epoch; text: loss by step, validation bits per byte by training
    seconds) and ``ranks.png`` (trainable/stored fraction, rank per layer) to ``out``; return their paths. Needs
    matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return []
    text = "val_bpb" in metrics[0]
    x_key = "step" if text else "epoch"
    xs = [m[x_key] for m in metrics]
    paths = []

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    held_out = "val" if text else "test"
    ax_loss.plot(xs, [m["train_loss"] for m in metrics], label="train")
    ax_loss.plot(xs, [m[f"{held_out}_loss"] for m in metrics], label=held_out)
    ax_loss.set(xlabel=x_key, ylabel="loss", title="loss")
    if text:
        ax_acc.plot([m["train_seconds"] for m in metrics], [m["val_bpb"] for m in metrics], marker=".", label="val")
        ax_acc.set(xlabel="training seconds", ylabel="bits per byte", title="validation bits per byte")
    else:
        ax_acc.plot(xs, [m["train_top1"] for m in metrics], label="train")
        ax_acc.plot(xs, [m["test_top1"] for m in metrics], label="test")
        ax_acc.set(xlabel="epoch", ylabel="top-1", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    paths.append(save_figure(fig, os.path.join(out, "curves.png")))

    fig, (ax_frac, ax_rank) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_frac.plot(xs, [m["trainable_fraction"] for m in metrics], label="trainable")
    ax_frac.plot(xs, [m["stored_fraction"] for m in metrics], label="stored")
    ax_frac.set(xlabel=x_key, ylabel="fraction of the dense model", title="parameters", ylim=(0, None))
    ax_frac.legend()
    names = list(metrics[-1].get("ranks", {}))
    for name in names:
        ax_rank.plot(xs, [m["ranks"].get(name) for m in metrics], label=name)
    ax_rank.set(xlabel=x_key, ylabel="rank", title="rank per layer")
    if 0 < len(names) <= 12:
        ax_rank.legend(fontsize=6)
    for ax in (ax_frac, ax_rank):
        ax.grid(alpha=0.3)
    paths.append(save_figure(fig, os.path.join(out, "ranks.png")))
    return paths


def save_figure(fig, path: str) -> str:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
