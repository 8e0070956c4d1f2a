"""What a training run writes as it goes: metrics files, TensorBoard, stability series, results, plots."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import OIALRConfig, StabilityTracker, files, save_pretrained
from ..stability import weight_matrix


def param_stats(model: nn.Module, summary: dict | None, dense_params: int) -> dict[str, Any]:
    """Phase, trainable and stored parameter counts (and fractions of the dense model), rank per layer."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored = sum(p.numel() for p in model.parameters())
    return {
        "phase": summary["phase"] if summary else "full-rank",
        "trainable_params": trainable, "stored_params": stored,
        "trainable_fraction": trainable / dense_params, "stored_fraction": stored / dense_params,
        "ranks": {n: layer["rank"] for n, layer in summary["layers"].items()} if summary else {},
    }


def optimizer_state_params(optimizer: torch.optim.Optimizer) -> int:
    """Numbers the optimizer keeps besides the weights: its state tensors (not the 0-d step counters) and the
    matrices of state objects that hold one (GaLore's projectors, ``ortho_matrix``)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            value = getattr(value, "ortho_matrix", value)
            for t in value if isinstance(value, list) else [value]:
                total += t.numel() if isinstance(t, torch.Tensor) and t.dim() > 0 else 0
    return total


def done_message(results: dict) -> str:
    """The closing line of ``oialr train``: the headline metric, parameters and time."""
    if results.get("val_bpb") is not None:
        score = f"val bpb {results['val_bpb']:.4f} (best {results['best_val_bpb']:.4f})"
    else:
        score = f"top1 {results['top1']:.4f} (best {results['best_top1']:.4f})"
    return (f"{score}, trainable {results['trainable_params']:,} of {results['dense_params']:,} parameters, "
            f"{results['train_seconds']:.1f}s")


def progress(loader, desc: str, enabled: bool):
    """``loader`` wrapped in a tqdm progress bar with ETA (on a terminal, when tqdm is installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return loader
    return tqdm(loader, desc=desc, leave=False, disable=None if enabled else True, dynamic_ncols=True)


class RunFiles:
    """The files of one run folder; every write is atomic (:mod:`oialr.files`)."""

    def __init__(self, out: str, x_key: str = "epoch", first: int = 0):
        """``x_key``: the metrics key TensorBoard plots against (``epoch``, or ``step`` for text); ``first``: its
        value where this start of the run begins (later events of an interrupted run are purged)."""
        self.out = out
        self._x_key, self._first = x_key, first
        self._writer: Any = None

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def end_of_epoch(self, metrics: list[dict], tracker: StabilityTracker | None) -> None:
        """``metrics.jsonl``/``.csv`` (every epoch so far), TensorBoard scalars, the stability series."""
        files.write_jsonl(self.path("metrics.jsonl"), metrics)
        files.write_csv(self.path("metrics.csv"), [{k: v for k, v in r.items() if k != "ranks"} for r in metrics])
        self._tensorboard(metrics[-1])
        if tracker is not None:
            tracker.write_jsonl(self.path("stability.jsonl"))
            tracker.write_csv(self.path("stability.csv"))

    def _tensorboard(self, row: dict) -> None:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._writer = False
                return
            self._writer = SummaryWriter(self.path("tensorboard"), purge_step=self._first)
        if self._writer:
            for key in ("train_loss", "train_top1", "test_loss", "test_top1", "val_loss", "val_bpb", "lr",
                        "trainable_fraction"):
                if key in row:
                    self._writer.add_scalar(key, row[key], row[self._x_key])
            self._writer.flush()

    def final(self, results: dict, metrics: list[dict], model: nn.Module, compact: nn.Module,
              tracker: StabilityTracker | None, log, config: OIALRConfig | None = None) -> None:
        """``results.json``; ``model/`` (the trained model as it is, factored layers included, with the run's
        ``config``) and ``compact/`` (:func:`oialr.compact_lowrank`'s plain torch layers), each
        ``model.safetensors`` + ``oialr_config.json`` (:func:`oialr.save_pretrained`; reload into a freshly built
        model with :func:`oialr.from_pretrained`); ``spectra.json`` (with a tracker) and the PNG plots."""
        files.write_json(self.path("results.json"), results)
        save_pretrained(model, self.path("model"), config)
        save_pretrained(compact, self.path("compact"))
        if tracker is not None:
            files.write_json(self.path("spectra.json"), spectra(model, tracker.layers))
        try:
            from .plots import plot_run
            plot_run(metrics, self.out)
        except ImportError as err:
            log(f"plots skipped ({err}); pip install matplotlib")


@torch.no_grad()
def spectra(model: nn.Module, names: list[str]) -> dict[str, list[float]]:
    """Singular values of each named layer now (descending), for the spectrum plot."""
    return {name: torch.linalg.svdvals(weight_matrix(model, name).double()).tolist() for name in names}
