"""Pure tensor maths: robust SVD, rank selection, re-orthonormalization."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import warn

# Bases whose columns drift further than this from orthonormal (max |QᵀQ - I|) are re-orthonormalized.
ORTHONORMALITY_TOL = 1e-5


def matrix_view(weight: Tensor) -> Tensor:
    """View a weight of any rank as a matrix ``out × rest`` (conv ``(c_out, c_in, *k)`` -> ``c_out × c_in·Πk``)."""
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``A = U diag(s) Vᵀ`` of a matrix, computed in float32 or better, outside autocast.

    Returns ``U (m×k)``, ``s (k)`` descending, ``V (n×k)`` with ``k = min(m, n)``, in the computation dtype
    (float32, or float64 for float64 input). If LAPACK/cuSOLVER fails to converge the SVD is retried in float64,
    then through the eigendecomposition of the Gram matrix, instead of crashing.
    """
    work_dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    a = matrix.detach().to(work_dtype)
    with torch.autocast(device_type=a.device.type, enabled=False):
        try:
            u, s, vh = torch.linalg.svd(a, full_matrices=False)
        except torch.linalg.LinAlgError:
            warn(f"SVD of a {tuple(a.shape)} matrix did not converge in {work_dtype}; retrying in float64")
            try:
                u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
            except torch.linalg.LinAlgError:
                u, s, vh = _svd_via_gram(a.double())
            u, s, vh = u.to(work_dtype), s.to(work_dtype), vh.to(work_dtype)
    return u, s, vh.mT


def _svd_via_gram(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD from ``eigh(AᵀA)`` (or ``AAᵀ``): less accurate for small singular values, but it always converges."""
    transpose = a.shape[0] < a.shape[1]
    if transpose:
        a = a.mT
    evals, evecs = torch.linalg.eigh(a.mT @ a)                      # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    s = evals.sqrt()
    u = a @ evecs / s.clamp_min(torch.finfo(a.dtype).tiny)
    u, _ = torch.linalg.qr(u)                                        # repair columns of tiny s
    u = u * torch.sign(torch.sum(u * (a @ evecs), dim=0)).where(s > 0, torch.ones_like(s))
    vh = evecs.mT
    return (vh.mT, s, u.mT) if transpose else (u, s, vh)


def select_rank(s: Tensor, *, cutoff: float, max_rank: int, min_rank: int = 1,
                current_rank: int | None = None, max_drop_fraction: float = 1.0) -> int:
    """Number of leading singular values to keep.

    ``r = #{i : s_i >= cutoff · s_1}``, then clipped to ``[min_rank, max_rank]``, to at least
    ``current_rank - floor(max_drop_fraction · current_rank)`` when ``current_rank`` is given, and to ``len(s)``.
    ``s`` must be sorted in descending order.
    """
    k = s.numel()
    if k == 0:
        raise ValueError("select_rank needs at least one singular value, got an empty tensor")
    keep = int((s >= cutoff * s[0]).sum()) if s[0] > 0 else 1
    keep = min(keep, max_rank)
    if current_rank is not None:
        keep = max(keep, current_rank - math.floor(max_drop_fraction * current_rank))
    return max(1, min(max(keep, min_rank), k))


def orthonormality_error(q: Tensor) -> float:
    """``max |QᵀQ - I|`` for a matrix with (intended) orthonormal columns."""
    gram = q.mT.double() @ q.double()
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max().item()


def orthonormalize(q: Tensor) -> tuple[Tensor, Tensor]:
    """``Q = Q' R`` (thin QR, ``diag R > 0``): orthonormal ``Q'`` and the ``r×r`` factor ``R`` to fold back."""
    q_new, r = torch.linalg.qr(q)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q_new * signs, r * signs[:, None]


# Singular values below POLAR_RTOL · σ_max count as zero in the polar factor: float32 weights do not resolve weaker
# directions (rounding is ~1.2e-7 · σ_max per entry), and the float64 Gram matrix resolves σ down to ~1e-8 · σ_max,
# so the threshold sits between the two with room on both sides.
POLAR_RTOL = 1e-6


def tall_view(weight: Tensor) -> Tensor:
    """The weight as a matrix (:func:`matrix_view`), transposed if wider than tall, so ``m >= n``."""
    matrix = matrix_view(weight)
    return matrix.mT if matrix.shape[0] < matrix.shape[1] else matrix


def gram_inverse_sqrt(gram: Tensor, *, rtol: float = POLAR_RTOL) -> tuple[Tensor, Tensor]:
    """Pseudo-inverse square root of symmetric PSD ``G (..., n, n)`` (a Gram matrix ``AᵀA``), batched.

    ``G = V diag(λ) Vᵀ`` (``eigh``); returns ``G^{+1/2} = V_r diag(λ_r^{-1/2}) V_rᵀ`` over the eigenvalues
    ``λ_i > rtol² · λ_max`` (the others count as zero; a zero matrix gives zero, not NaN), and ``λ (..., n)``
    clamped at 0, in descending order. Computed in ``G``'s dtype; pass float64 (see :func:`polar_factor`).
    """
    with torch.autocast(device_type=gram.device.type, enabled=False):
        evals, evecs = torch.linalg.eigh(gram)                                   # ascending
        evals = evals.clamp_min(0)
        keep = evals > rtol * rtol * evals[..., -1:]
        inv_sqrt = torch.where(keep, evals.clamp_min(torch.finfo(evals.dtype).tiny).rsqrt(), 0.0)
        root = (evecs * inv_sqrt.unsqueeze(-2)) @ evecs.mT                       # V diag(λ^{-1/2}) Vᵀ
    return root, evals.flip(-1)


def polar_factor(matrix: Tensor, *, rtol: float = POLAR_RTOL) -> tuple[Tensor, Tensor]:
    """Polar factor ``Q = U_r V_rᵀ`` and singular values of ``A (..., m, n)``, batched over leading dimensions.

    With the thin SVD ``A = U diag(s) Vᵀ``, ``Q`` keeps the ``r`` directions with ``s_i > rtol · s_1``; for full
    column rank it is the orthogonal polar factor (``QᵀQ = I``), unique whatever the SVD's sign choices. Computed
    without an SVD, through the Gram matrix (``m >= n``; a wide ``A`` is handled through ``Aᵀ``)::

        G = AᵀA  (n×n),   Q = A G^{+1/2}  (m×n),   s = sqrt(eig(G))  descending

    in float64 outside autocast, because the Gram matrix squares the condition number ``κ``: in float32 ``Q`` would
    be off by about ``κ² · 6e-8`` (1e-3 at ``κ = 100``), in float64 by ``κ² · 1e-16``. Returns float64 tensors
    ``Q (..., m, n)`` and ``s (..., min(m, n))``. Raises ``torch.linalg.LinAlgError`` for non-finite input.
    """
    if matrix.shape[-2] < matrix.shape[-1]:
        q, s = polar_factor(matrix.mT, rtol=rtol)
        return q.mT, s
    with torch.autocast(device_type=matrix.device.type, enabled=False):
        a = matrix.detach().double()
        root, evals = gram_inverse_sqrt(a.mT @ a, rtol=rtol)
        return a @ root, evals.sqrt()


def qr_r_factor(matrix: Tensor) -> Tensor:
    """``R (..., n, n)`` of the thin QR ``A = QR`` of ``A (..., m, n)``, ``m >= n``, with ``diag R >= 0``, batched.

    Fixing the signs makes ``R`` unique for full column rank (Householder QR leaves each row's sign free). Computed
    in float64 outside autocast.
    """
    with torch.autocast(device_type=matrix.device.type, enabled=False):
        r = torch.linalg.qr(matrix.detach().double(), mode="r")[1]
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        return r * torch.where(signs == 0, 1.0, signs).unsqueeze(-1)
