"""A few rows of each converted layer's output from a training forward, so that a size budget can weigh each
singular component of a weight by what it contributes to the layer's output, not by its singular value alone.

For ``W = Σ_i s_i u_i v_iᵀ (m×n)`` and an input ``x``, the output without bias is ``y − b = W x``, so
``u_iᵀ (y − b) = s_i v_iᵀ x``: projecting recorded output rows ``Y (k×m)`` on the left singular vectors gives each
component's output scale

    t_i = √(mean_rows (Y u_i)²) = s_i √(E[(v_iᵀ x)²])                  (:func:`output_values`)

without the inputs (a convolution's unfolded patches would be large) and without knowing the SVD when the rows are
recorded. The controller hooks the layers only for the forward of a step whose end may allocate ranks (the
transition, or under ``warmup_steps="auto"`` every stability sample; with ``augment_bases``, every basis update):
the other steps run without hooks. A weight's small singular values can carry large outputs: the first layer of an
image model sees raw pixels, whose strong directions need not be the weight's. Only layers holding one weight
matrix (a registered layer type, dense or factored) are recorded; an ``nn.MultiheadAttention`` projection is not
(its output is not a module's), and the budget then reads its singular values alone.
"""
from __future__ import annotations

from torch import Tensor, nn

from .layer_types import CONVS, dense_type_of, factored_type_of
from .layers import LowRankConv

ROWS = 256          # output rows kept per layer: one row per token or output position


def output_values(s: Tensor, U: Tensor, rows: Tensor | None) -> Tensor:
    """``t_i = √(mean_k (rows U)_{ki}²)`` (module docstring) for ``U (m×r)`` orthonormal with singular values
    ``s (r)``, in ``s``'s dtype; ``s`` itself when ``rows`` is None, not ``m`` wide, or carries no finite, non-zero
    output."""
    if rows is None or rows.shape[-1] != U.shape[0]:
        return s
    t = (rows.to(U) @ U).pow(2).mean(0).sqrt().to(s.dtype)
    return t if bool(t.isfinite().all()) and bool(t.sum() > 0) else s


def sample_rows(output: Tensor, bias: Tensor | None, channel_dim: int, rows: int = ROWS) -> Tensor:
    """At most ``rows`` rows ``(k×m)`` of ``output − bias`` with the ``m`` channels (``channel_dim``) last, spread
    evenly over the batch and positions (no randomness: the training's random streams are left alone), float32."""
    y = output.detach()
    m = y.shape[channel_dim]
    if channel_dim % y.dim() != y.dim() - 1:       # channels first: pick a few items before the copy movedim makes
        per_item = max(1, y[0].numel() // m)
        items = min(y.shape[0], -(-rows // per_item))
        y = y[::max(1, y.shape[0] // items)][:items].movedim(channel_dim, -1)
    y = y.reshape(-1, m)
    y = y[::max(1, y.shape[0] // rows)][:rows].float()
    return y - bias.detach().float() if bias is not None else y.clone()


class OutputSampler:
    """Forward hooks on the converted layers keeping :func:`sample_rows` of each one's latest output in training
    mode (``module.training``; evaluation forwards are ignored) in :attr:`rows`, by layer name. :meth:`attach` again
    after the layers were replaced (the transition)."""

    def __init__(self) -> None:
        self.rows: dict[str, Tensor] = {}
        self._handles: list = []

    def attach(self, model: nn.Module, names: list[str]) -> None:
        """Record the layers ``names`` of ``model`` from now on (dropping earlier hooks and rows)."""
        self.detach()
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:                  # an attention projection: not a module of its own
                continue
            if dense_type_of(module) is None and factored_type_of(module) is None:
                continue
            channel_dim = 1 if isinstance(module, (*CONVS, LowRankConv)) else -1
            # prepend: before FSDP2's post-forward hook shards the bias again
            self._handles.append(module.register_forward_hook(_Record(self, name, channel_dim), prepend=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.rows = [], {}


class _Record:
    """The forward hook of one layer (an object, not a closure: a model holding it still pickles, and a deep copy
    of the model records into a copy of the sampler, not into this one)."""

    def __init__(self, sampler: OutputSampler, name: str, channel_dim: int) -> None:
        self.sampler, self.name, self.channel_dim = sampler, name, channel_dim

    def __call__(self, module: nn.Module, inputs, output) -> None:
        if module.training and isinstance(output, Tensor):
            self.sampler.rows[self.name] = sample_rows(output, getattr(module, "bias", None), self.channel_dim)
