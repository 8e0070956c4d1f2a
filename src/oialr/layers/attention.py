"""LowRankMultiheadAttention: ``nn.MultiheadAttention`` with its projections as swappable child modules."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import LowRankLinear


def _project(module: nn.Module, x: Tensor, rows: slice) -> Tensor:
    """Output features ``rows`` of the linear layer ``module`` applied to ``x``, without computing the others."""
    if isinstance(module, LowRankLinear):
        return module.forward_rows(x, rows)
    bias = None if module.bias is None else module.bias[rows]
    return F.linear(x, module.weight[rows], bias)


def _linear_around(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` holding the given Parameter objects (built on the meta device, so nothing is allocated)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def _dense(module: nn.Module) -> nn.Module:
    return module.to_dense() if isinstance(module, LowRankLinear) else module


def _additive_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (``True`` = masked) becomes ``0 / -inf`` in ``dtype``; a float mask is returned as is."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class LowRankMultiheadAttention(nn.Module):
    """Exactly ``nn.MultiheadAttention`` (same arguments, outputs and gradients), projections as child modules.

    With ``E = embed_dim``, ``H = num_heads``, ``d = E / H``, query ``(N, L, E)``, key ``(N, S, kdim)``,
    value ``(N, S, vdim)`` (shown batch first; ``batch_first=False`` takes ``(L, N, ·)``, unbatched ``(L, ·)``)::

        q = query W_qᵀ + b_q,  k = key W_kᵀ + b_k,  v = value W_vᵀ + b_v      each (N, ·, E), split into H heads of d
        A_h = softmax(q_h k_hᵀ / √d + attn_mask + key_padding_mask)           (N, H, L, S), then dropout
        out = concat_h(A_h v_h) W_oᵀ + b_o                                     (N, L, E)

    ``add_bias_kv`` appends ``bias_k``/``bias_v`` as one more key/value, ``add_zero_attn`` one zero key/value per
    head. Projections: ``in_proj`` (``nn.Linear(E, 3E)``, rows ``[W_q; W_k; W_v]``) when ``kdim == vdim == E``,
    else bias-free ``q_proj``/``k_proj``/``v_proj`` plus one joint bias (3E; the Parameter ``qkv_bias``, read as
    ``in_proj_bias`` like torch's); then ``out_proj``. Any projection may be a :class:`LowRankLinear`.
    :meth:`from_torch` reuses the original Parameter objects and ``out_proj`` module.
    """

    merge_masks = nn.MultiheadAttention.merge_masks     # read by nn.TransformerEncoderLayer's inference fast path

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None) -> None:
        """Same arguments and initialisation as ``nn.MultiheadAttention``."""
        super().__init__()
        self._adopt(nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                                          vdim, batch_first, device=device, dtype=dtype))

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> LowRankMultiheadAttention:
        """Re-express ``mha``, sharing its Parameter objects and its ``out_proj`` module."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._adopt(mha)
        return self

    def _adopt(self, mha: nn.MultiheadAttention) -> None:
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.dropout, self.batch_first, self.add_zero_attn = mha.dropout, mha.batch_first, mha.add_zero_attn
        if self._qkv_same_embed_dim:
            self.in_proj = _linear_around(mha.in_proj_weight, mha.in_proj_bias)
        else:
            self.q_proj = _linear_around(mha.q_proj_weight, None)
            self.k_proj = _linear_around(mha.k_proj_weight, None)
            self.v_proj = _linear_around(mha.v_proj_weight, None)
            self.qkv_bias = mha.in_proj_bias        # one (3E) Parameter, as in torch; None without bias
        self.out_proj = mha.out_proj
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v
        self.train(mha.training)

    # --- the attributes of nn.MultiheadAttention that other modules read; weights are dense (U Σ Vᵀ if factored)
    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.in_proj.bias if self._qkv_same_embed_dim else self.qkv_bias

    @property
    def in_proj_weight(self) -> Tensor | None:
        return self.in_proj.weight if self._qkv_same_embed_dim else None

    @property
    def q_proj_weight(self) -> Tensor | None:
        return None if self._qkv_same_embed_dim else self.q_proj.weight

    @property
    def k_proj_weight(self) -> Tensor | None:
        return None if self._qkv_same_embed_dim else self.k_proj.weight

    @property
    def v_proj_weight(self) -> Tensor | None:
        return None if self._qkv_same_embed_dim else self.v_proj.weight

    def to_torch(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` computing the same function; factored projections are made dense,
        every other Parameter (and a dense ``out_proj`` module) is shared, not copied."""
        ref = self.out_proj.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, self.in_proj_bias is not None,
                                    self.bias_k is not None, self.add_zero_attn, self.kdim, self.vdim,
                                    self.batch_first, device=ref.device, dtype=ref.dtype)
        if self._qkv_same_embed_dim:
            mha.in_proj_weight = _dense(self.in_proj).weight
        else:
            mha.q_proj_weight = _dense(self.q_proj).weight
            mha.k_proj_weight = _dense(self.k_proj).weight
            mha.v_proj_weight = _dense(self.v_proj).weight
        mha.in_proj_bias = self.in_proj_bias
        mha.out_proj = _dense(self.out_proj)
        mha.bias_k, mha.bias_v = self.bias_k, self.bias_v
        return mha.train(self.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Same arguments, shapes and results as ``nn.MultiheadAttention.forward``."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("LowRankMultiheadAttention does not take nested tensors")
        batched = self._check_shapes(query, key, value, key_padding_mask)
        E, H, d = self.embed_dim, self.num_heads, self.head_dim

        def to_batch_first(x: Tensor) -> Tensor:
            return x if batched and self.batch_first else x.transpose(0, 1) if batched else x.unsqueeze(0)

        q, k, v = (to_batch_first(t) for t in self._in_projection(query, key, value))   # (N, L|S, E)
        N, L, S = q.shape[0], q.shape[1], k.shape[1]
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        mask, is_causal = self._merged_mask(attn_mask, key_padding_mask, is_causal, need_weights, N, L, S, q.dtype)

        appended = 0                                # key/value columns added after the S real ones, never masked
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            appended += 1
        q, k, v = (t.unflatten(-1, (H, d)).transpose(1, 2) for t in (q, k, v))        # (N, H, L|S, d)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, d)], dim=2)
            appended += 1
        if mask is not None and appended:
            mask = F.pad(mask, (0, appended))

        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-2, -1))         # (N, H, L, S')
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout > 0:
                weights = F.dropout(weights, p=dropout)    # as torch: the returned weights are the dropped ones
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal)

        # (N, H, L, d) -> (L, N, E) or (N, L, E), then the output projection
        out = out.permute(2, 0, 1, 3) if batched and not self.batch_first else out.transpose(1, 2)
        out = self.out_proj(out.flatten(-2))
        if not batched:
            out = out.squeeze(0)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        return out, weights

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` with ``E`` features each; every input goes only through the rows it needs."""
        E = self.embed_dim
        if not self._qkv_same_embed_dim:
            biases = (None,) * 3 if self.qkv_bias is None else self.qkv_bias.chunk(3)
            return tuple(proj(x) if b is None else proj(x) + b
                         for proj, x, b in zip((self.q_proj, self.k_proj, self.v_proj), (query, key, value), biases))
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        q = _project(self.in_proj, query, slice(0, E))
        if key is value:
            return (q, *_project(self.in_proj, key, slice(E, 3 * E)).chunk(2, dim=-1))
        return q, _project(self.in_proj, key, slice(E, 2 * E)), _project(self.in_proj, value, slice(2 * E, 3 * E))

    def _merged_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
                     need_weights: bool, N: int, L: int, S: int, dtype: torch.dtype) -> tuple[Tensor | None, bool]:
        """The additive mask ``attn_mask + key_padding_mask`` broadcastable to ``(N, H, L, S)`` (or None), and
        whether to let SDPA apply the causal mask itself (torch's rules for the ``is_causal`` hint)."""
        if key_padding_mask is not None and key_padding_mask.shape != (N, S):
            raise ValueError(f"key_padding_mask must have shape {(N, S)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=3)     # as torch; both work
        key_padding_mask = _additive_mask(key_padding_mask, "key_padding_mask", dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            return None, True                       # as torch: trust the hint, SDPA builds the causal mask
        attn_mask = _additive_mask(attn_mask, "attn_mask", dtype)
        if attn_mask is not None:
            if attn_mask.dim() == 2 and attn_mask.shape == (L, S):
                attn_mask = attn_mask.view(1, 1, L, S)
            elif attn_mask.dim() == 3 and attn_mask.shape == (N * self.num_heads, L, S):
                attn_mask = attn_mask.view(N, self.num_heads, L, S)
            else:
                raise ValueError(f"attn_mask must have shape {(L, S)} or {(N * self.num_heads, L, S)}, "
                                 f"got {tuple(attn_mask.shape)}")
        if key_padding_mask is None:
            return attn_mask, False                 # is_causal only ever reaches SDPA through the branch above
        key_padding_mask = key_padding_mask.view(N, 1, 1, S)
        return (key_padding_mask if attn_mask is None else attn_mask + key_padding_mask), False

    def _check_shapes(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None) -> bool:
        """Raise ValueError on inconsistent inputs; return whether the input is batched (3-D)."""
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got {query.dim()}-D")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key and value must be {query.dim()}-D like query, got {key.dim()}-D and "
                             f"{value.dim()}-D")
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise ValueError(f"key_padding_mask must be {query.dim() - 1}-D, got {key_padding_mask.dim()}-D")
        for name, x, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.shape[-1] != dim:
                raise ValueError(f"{name} must have {dim} features (last dimension), got {x.shape[-1]}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must have the same sequence and batch sizes, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        batch_dim = 0 if self.batch_first else 1
        if query.dim() == 3 and query.shape[batch_dim] != key.shape[batch_dim]:
            raise ValueError(f"query and key must have the same batch size, got {tuple(query.shape)} and "
                             f"{tuple(key.shape)}")
        return query.dim() == 3

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
