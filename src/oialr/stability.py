"""StabilityTracker: the basis stability and spectrum of a model's weight matrices over training, for any training
loop (the metrics: :mod:`oialr.stability_metrics`; the files: :mod:`oialr.stability_files`)."""
from __future__ import annotations

import copy
import math
import os
import time
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from . import linalg, stability_files
from ._checks import Errors, check_same_settings, check_state_version, is_int, is_real, warn
from .layers import LowRankLayer
from .layer_types import dense_type_of
from .stability_metrics import network_stability, polar_alignment, spectrum_stats
from .targets import as_matrix, layer_weight, weight_layers

__all__ = ["layer_names", "weight_matrix", "StabilityTracker"]

STATE_VERSION = 2
OVERHEAD_WARNING = 0.05            # warn (once, at the fourth sample) when sampling takes more of the time than this
_CHUNK_ELEMENTS = 2 ** 24           # at most this many float64 weight entries (128 MiB) go through one batched eigh


def layer_names(model: nn.Module, *, trainable_only: bool = False) -> list[str]:
    """Names of the weight matrices the tracker can measure, in registration order, named as OIALR names them
    (:func:`oialr.targets.weight_layers`; layers their type keeps dense, such as grouped convs, left out).
    ``trainable_only`` leaves out weights with ``requires_grad=False`` (for factored layers: ``Σ``'s flag)."""
    return [name for name, module, weight, _ in weight_layers(model)
            if not _type_keeps_dense(module) and (weight.requires_grad or not trainable_only)]


def _type_keeps_dense(module: nn.Module) -> bool:
    entry = dense_type_of(module)
    return entry is not None and entry.dense_reason(module) is not None


def weight_matrix(model: nn.Module, name: str) -> Tensor:
    """The weight of the layer ``name`` (a :func:`layer_names` name) as a detached ``out × rest`` matrix.

    Resolved against ``model`` at every call, so it follows modules that OIALR replaced. A factored layer gives its
    dense product ``U Σ Vᵀ`` computed in float64 (so it has exactly rank ``r``); other layers their own weight.
    """
    module, weight = layer_weight(model, name)
    if isinstance(module, LowRankLayer):
        U, S, V = (p.detach().double() for p in (module.lowrank_U, module.lowrank_S, module.lowrank_V))
        return (U @ S) @ V.mT
    return as_matrix(module, weight.detach())



class StabilityTracker:
    """Records the basis stability and spectrum of a model's weight matrices every ``every`` optimizer steps.

    Call :meth:`step` once after every ``optimizer.step()``::

        tracker = StabilityTracker(model, every=50)
        for x, y in data:
            loss_fn(model(x), y).backward()
            optimizer.step(); optimizer.zero_grad()
            tracker.step()
        tracker.write_csv("stability.csv")

    At steps ``every, 2·every, …`` (counted in ``step()`` calls; forward passes and evaluation advance nothing) each
    tracked weight, as a tall matrix ``W (m×n)``, gives ``Q`` and ``s`` (:func:`oialr.linalg.polar_factor`, one
    batched float64 ``eigh`` per weight shape) and a record ``{"step", "lag_steps", "network_stability",
    "weighted_stability", "layers": {name: {...}}}`` with, per layer, its ``shape`` (``out × rest``) and

        stability       tr(Q_prevᵀ Q) / n against the sample ``lag`` samples earlier, ``lag·every`` steps back
                        (/ rank if rank-deficient, see :func:`oialr.basis_stability`); None at the first ``lag`` samples
        sigma_max, effective_rank, rank_at_cutoff       see :func:`oialr.stability_metrics.spectrum_stats`
        mixing          (``mixing=True``) ‖R − R_prev‖_F / ‖R_prev‖_F for W = QR, diag R >= 0, same ``R_prev``

    and, over the layers that have a stability, their mean and their mean weighted by ``m·n`` (None when none has).
    A layer with non-finite weights gets None everywhere and a fresh start. Layers: ``layers`` (names from
    :func:`layer_names`), by default every trainable one. Names are resolved against ``model`` at each sample
    (:func:`weight_matrix`), so modules replaced by OIALR's transition keep their series (measured as ``U Σ Vᵀ``).
    Samples close together show stability as a speed (near 1 from the start, following the learning rate); a larger
    ``lag`` compares bases further apart at the same sampling cost. Memory: ``lag`` float32 ``Q (m×n)`` per layer
    (plus as many ``R (n×n)`` with ``mixing``), so stability is exact to ~1e-7 (clamped to ``[-1, 1]``).
    Time per sample: ``4·m·n²`` float64 flops plus an ``n×n`` ``eigh`` per layer, about ``4·n / B`` training steps
    for an ``n×n`` layer trained on ``B`` rows (tokens) per step. At ``every=50`` that is 0.6% of the training time
    of a width-256 transformer at 3.6k tokens per step, but ~35% for a width-512 MLP at batch 128. :attr:`overhead`
    is the measured share; at the fourth sample a warning names the ``every`` that keeps it under 5% if it is above.
    """

    def __init__(self, model: nn.Module, every: int = 50, cutoff: float = 0.1, mixing: bool = False,
                 layers: list[str] | None = None, lag: int = 1) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        errors = Errors()
        errors.check(is_int(every) and every >= 1,
                     f"every must be an integer >= 1 (optimizer steps between samples), got {every!r}")
        errors.check(is_real(cutoff) and 0.0 <= cutoff < 1.0,
                     f"cutoff must be a number in [0, 1) (as OIALRConfig.cutoff), got {cutoff!r}")
        errors.check(is_int(lag) and lag >= 1,
                     f"lag must be an integer >= 1 (samples between the two compared snapshots), got {lag!r}")
        errors.check(isinstance(mixing, bool), f"mixing must be True or False, got {mixing!r}")
        available = layer_names(model)
        if layers is None:
            layers = layer_names(model, trainable_only=True)
        elif not (isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers)):
            errors.check(False, f"layers must be None or a list of layer names, got {layers!r}")
        else:
            unknown = [n for n in layers if n not in available]
            errors.check(not unknown, f"layers {unknown} are not weight matrices of the model; choose from "
                                      f"{available}")
        if not errors.messages:
            errors.check(bool(layers), f"no weight matrix to track (layers found: {available}); pass layers=[...] "
                                       "to choose some")
        errors.raise_if_any("StabilityTracker")
        self.model, self.every, self.cutoff, self.mixing, self.lag = model, every, float(cutoff), mixing, lag
        self.layers: list[str] = list(layers)
        self.step_count = 0
        self.records: list[dict[str, Any]] = []
        self._q: dict[str, list[Tensor]] = {}   # polar factors of the last `lag` samples, oldest first, float32 (m×n)
        self._r: dict[str, list[Tensor]] = {}   # R of W = QR at the same samples, float32 (n×n), with mixing
        self._clock = {"start": None, "steps": 0, "samples": 0, "sampling": 0.0}   # this process's timing

    def step(self) -> dict[str, Any] | None:
        """Advance one optimizer step; at every ``every``-th step, sample and return the new record."""
        self.step_count += 1
        clock = self._clock
        clock["steps"] += clock["start"] is not None
        if self.step_count % self.every:
            return None
        began = time.perf_counter()
        record = self.sample()
        if clock["start"] is None:                  # the first sample warms up the kernels: time from its end
            clock["start"] = time.perf_counter()
        else:
            clock["samples"] += 1
            clock["sampling"] += time.perf_counter() - began
        if clock["samples"] == 3 and self.overhead > OVERHEAD_WARNING:
            training = max(time.perf_counter() - clock["start"] - clock["sampling"], 1e-9) / clock["steps"]
            needed = math.ceil(clock["sampling"] / clock["samples"] / training * (1 / OVERHEAD_WARNING - 1))
            warn(f"StabilityTracker: sampling took {self.overhead:.0%} of the time since the first sample at "
                 f"every={self.every}; sample every >= {needed} steps to keep it under {OVERHEAD_WARNING:.0%} "
                 "(StabilityTracker(every=...), OIALRConfig.auto.every, or oialr train --set stability_every=...)")
        return record

    @property
    def overhead(self) -> float | None:
        """Time spent sampling / wall time, both counted from the end of this process's first sample (None before)."""
        if self._clock["start"] is None:
            return None
        return self._clock["sampling"] / max(time.perf_counter() - self._clock["start"], 1e-9)

    @torch.no_grad()
    def sample(self) -> dict[str, Any]:
        """Measure every tracked layer now and append (and return) a record for the current step."""
        layers: dict[str, dict[str, Any]] = {}
        groups: dict[tuple, list[tuple[str, Tensor]]] = defaultdict(list)
        for name in self.layers:
            matrix = weight_matrix(self.model, name)
            layers[name] = {"shape": list(matrix.shape), "stability": None, "sigma_max": None,
                            "effective_rank": None, "rank_at_cutoff": None, **({"mixing": None} if self.mixing else {})}
            if torch.isfinite(matrix).all():
                tall = linalg.tall_view(matrix)
                groups[(tuple(tall.shape), tall.device)].append((name, tall))
            else:
                warn(f"StabilityTracker: layer {name!r} has non-finite weights at step {self.step_count}; it is "
                     "recorded as None and its series restarts")
                self._q.pop(name, None)
                self._r.pop(name, None)
        for key, items in groups.items():
            m, n = key[0]
            size = max(1, _CHUNK_ELEMENTS // (m * n))
            for start in range(0, len(items), size):
                self._measure(items[start:start + size], layers)
        record = {
            "step": self.step_count,
            "lag_steps": self.lag * self.every,
            "network_stability": network_stability(layers, self.layers),
            "weighted_stability": network_stability(layers, self.layers, weighted=True),
            "layers": layers,
        }
        self.records.append(record)
        return record

    def _measure(self, items: list[tuple[str, Tensor]], layers: dict[str, dict[str, Any]]) -> None:
        """Fill ``layers`` for same-shape tall matrices ``items`` through one batched polar factor; keep snapshots."""
        stack = torch.stack([w.double() for _, w in items])                   # (k, m, n) float64
        q, s = linalg.polar_factor(stack)
        sigma, erank, rank = spectrum_stats(s, self.cutoff)
        r = linalg.qr_r_factor(stack) if self.mixing else None
        for j, (name, _) in enumerate(items):
            out = layers[name]
            out["sigma_max"], out["effective_rank"], out["rank_at_cutoff"] = (
                sigma[j].item(), erank[j].item(), int(rank[j].item()))
            prev = self._lagged(self._q, name, q[j])
            if prev is not None:
                out["stability"] = polar_alignment(prev.to(q), q[j])
            if r is not None:
                prev = self._lagged(self._r, name, r[j])
                if prev is not None:
                    prev_norm = torch.linalg.matrix_norm(prev.to(r)).item()
                    diff = torch.linalg.matrix_norm(r[j] - prev.to(r)).item()
                    out["mixing"] = diff / prev_norm if prev_norm > 0 else None

    def _lagged(self, snapshots: dict[str, list[Tensor]], name: str, now: Tensor) -> Tensor | None:
        """Keep ``now`` as ``name``'s newest snapshot; return the one ``lag`` samples back, if it has ``now``'s shape
        (a rank change restarts the series)."""
        kept = [t for t in snapshots.get(name, []) if t.shape == now.shape]
        snapshots[name] = (kept + [now.float()])[-self.lag:]
        return kept[-self.lag] if len(kept) >= self.lag else None

    # ------------------------------------------------------------------ results files
    def write_jsonl(self, path: str | os.PathLike) -> None:
        """One JSON object per record (per sample), written atomically (:func:`oialr.stability_files.write_jsonl`)."""
        stability_files.write_jsonl(self.records, path)

    def write_csv(self, path: str | os.PathLike) -> None:
        """One row per (step, layer) and per step the network rows, written atomically
        (:func:`oialr.stability_files.write_csv`, columns :data:`~oialr.stability_files.CSV_FIELDS`)."""
        stability_files.write_csv(self.records, path)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Step counter, settings, records (plain values) and snapshots (tensors): ``torch.load(weights_only=True)``
        reads it back."""
        return {"version": STATE_VERSION, "step": self.step_count, "every": self.every, "lag": self.lag,
                "cutoff": self.cutoff, "mixing": self.mixing, "layers": list(self.layers),
                "records": copy.deepcopy(self.records), "snapshots": {k: list(v) for k, v in self._q.items()},
                "mixing_snapshots": {k: list(v) for k, v in self._r.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved series. The tracker must be built with the saved run's ``every``, ``lag``, ``cutoff``,
        ``mixing`` and layers."""
        check_state_version("StabilityTracker", state, STATE_VERSION)
        check_same_settings("StabilityTracker", state, {"every": self.every, "lag": self.lag, "cutoff": self.cutoff,
                                                        "mixing": self.mixing, "layers": self.layers})
        self.step_count = state["step"]
        self.records = copy.deepcopy(state["records"])
        self._q = {k: list(v) for k, v in state["snapshots"].items()}
        self._r = {k: list(v) for k, v in state["mixing_snapshots"].items()}
