"""FactorizedTraining: every eligible weight ``W (m×n)`` becomes two trained factors ``B A`` from its SVD, at step 0
(``factorized``, Pufferfish/CoLA-style) or after a full-rank warm-up (``svd-finetune``)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .. import OIALRConfig, linalg, optim_state
from ..convert import COMPACT_MARK, replace_module
from ..wrapper import Rewrapped
from .ranks import linear_layers, resolve_ranks

STATE_VERSION = 1


def factorize_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Two plain layers ``Linear(n, r, bias=False)`` then ``Linear(r, m)`` computing ``x ↦ x Aᵀ Bᵀ + b``.

    From the thin SVD ``W = U diag(s) Vᵀ`` (float32 or better), truncated to ``r``, with balanced factors
    ``A = diag(√s_r) V_rᵀ (r×n)`` and ``B = U_r diag(√s_r) (m×r)``; the bias is the layer's own Parameter object.
    At ``r = min(m, n)``, ``B A = W`` up to rounding. Both factors train.
    """
    m, n = layer.weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} layer, got {rank}")
    u, s, v = linalg.svd(layer.weight)
    root = s[:rank].sqrt()
    like = layer.weight
    down = nn.Linear(n, rank, bias=False, device="meta")
    up = nn.Linear(rank, m, bias=layer.bias is not None, device="meta")
    down.weight = nn.Parameter((root[:, None] * v[:, :rank].mT).to(like).contiguous())    # A (r×n)
    up.weight = nn.Parameter((u[:, :rank] * root).to(like).contiguous())                  # B (m×r)
    if layer.bias is not None:
        up.bias = layer.bias
    pair = nn.Sequential(down, up)
    setattr(pair, COMPACT_MARK, {"kind": "linear", "matrix_shape": [m, n], "rank": rank})   # for save_pretrained
    return pair


class FactorizedTraining:
    """Train ``model`` with each eligible layer as two factors (:func:`factorize_linear`) from ``start_step`` on.

    The layers are OIALR's (:func:`oialr.find_layers` with ``config``'s targeting rules: attention and MLP
    projections; embeddings, norms and the output layer stay dense), ``nn.Linear`` only; their ranks come from
    ``rank`` (:func:`resolve_ranks`). Call :meth:`step` after every ``optimizer.step()``, like
    :class:`oialr.OIALR`. ``start_step=0`` factors when built (``factorized``); ``start_step=T`` trains full-rank
    for ``T`` steps and factors inside the ``T``-th call of :meth:`step` (``svd-finetune``). At the switch each
    dense weight leaves its optimizer param group and its optimizer state is dropped; its two factors take its
    place in the same group with fresh state (Adam's step 0, so bias correction is exact). The learning-rate
    schedule is the caller's and goes on.

    Under ``torch.distributed`` every process factors the same (synchronised) weights; ``wrap`` (e.g. DDP) is
    rebuilt after the switch, which broadcasts rank 0's factors. Train through :attr:`wrapped_model`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: OIALRConfig,
                 rank: float | int | str, start_step: int = 0, *, wrap: Callable[[nn.Module], nn.Module] | None = None):
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
        self.model, self.optimizer, self.start_step = model, optimizer, start_step
        self._wrapper = Rewrapped(model, wrap)
        self.shapes = linear_layers(model, config)
        self.ranks = resolve_ranks(rank, self.shapes)
        self.step_count = 0
        self.transition_step: int | None = None
        self.transition_reason: str | None = None
        if start_step == 0:
            self._factorize("start_step=0: factored when built")

    @property
    def phase(self) -> str:
        return "full-rank" if self.transition_step is None else "low-rank"

    @property
    def wrapped_model(self) -> nn.Module:
        """``wrap(model)``, built on first use and again after the switch; ``model`` without ``wrap``."""
        return self._wrapper.module

    def step(self) -> None:
        """Advance one optimizer step; factor the layers when the warm-up is over."""
        self.step_count += 1
        if self.transition_step is None and self.step_count >= self.start_step:
            self._factorize(f"start_step={self.start_step} reached")

    @torch.no_grad()
    def _factorize(self, reason: str) -> None:
        for name in self.shapes:
            layer = self.model.get_submodule(name)
            new = factorize_linear(layer, self.ranks[name])
            optim_state.swap_param(self.optimizer, layer.weight, new[0].weight, new[1].weight)
            replace_module(self.model, name, new)
        self.transition_step, self.transition_reason = self.step_count, reason
        self._wrapper.invalidate()

    def summary(self) -> dict[str, Any]:
        """Phase, step, parameter counts and, per layer, rank and sizes (the keys of :meth:`oialr.OIALR.summary`)."""
        layers = {}
        for name, (m, n) in self.shapes.items():
            factored = self.transition_step is not None
            r = self.ranks[name] if factored else min(m, n)
            size = r * (m + n) if factored else m * n
            layers[name] = {"rank": r, "full_rank": min(m, n), "shape": [m, n], "dense_params": m * n,
                            "trainable_params": size, "stored_params": size}
        params = list(self.model.parameters())
        return {"phase": self.phase, "step": self.step_count, "transition_step": self.transition_step,
                "transition_reason": self.transition_reason,
                "trainable_params": sum(p.numel() for p in params if p.requires_grad),
                "stored_params": sum(p.numel() for p in params), "layers": layers}

    def state_dict(self) -> dict[str, Any]:
        """Plain values: step, switch step and reason, ranks."""
        return {"version": STATE_VERSION, "step": self.step_count, "transition_step": self.transition_step,
                "transition_reason": self.transition_reason, "ranks": dict(self.ranks), "start_step": self.start_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved run; then load the model's and the optimizer's state dicts (this call first factors the
        layers, with placeholder values, when the saved run had)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a FactorizedTraining state dict of version {STATE_VERSION}")
        if state["ranks"] != self.ranks or state["start_step"] != self.start_step:
            changed = sorted(k for k in self.ranks if state["ranks"].get(k) != self.ranks[k])
            raise ValueError(f"the saved run used other ranks or start step (start_step {state['start_step']} vs "
                             f"{self.start_step}; ranks differ for {changed[:3]}): was the rank file changed? "
                             "build it as in the saved run")
        if state["transition_step"] is not None and self.transition_step is None:
            self._factorize(state["transition_reason"])
        self.step_count = state["step"]
        self.transition_step, self.transition_reason = state["transition_step"], state["transition_reason"]

