"""A size budget: the ranks of all factored layers chosen together so that they store at most a given fraction of the
dense parameters they replace (pure functions over singular values and shapes)."""
from __future__ import annotations

import heapq
import math
from typing import Sequence

import torch
from torch import Tensor

from . import linalg
from .config import OIALRConfig
from .factorize import cut_rank, stored_params


def marginal_cost(m: int, n: int, r: int) -> int:
    """Stored parameters added by growing an ``m×n`` factorisation from rank ``r`` to ``r + 1``:
    ``(r+1)(m+n+r+1) − r(m+n+r) = m + n + 2r + 1`` (a column of ``U``, one of ``V``, a row and a column of ``Σ``)."""
    return m + n + 2 * r + 1


def min_stored_fraction(shapes: Sequence[tuple[int, int]], min_rank: int) -> float:
    """The smallest stored fraction reachable: every layer at ``min(min_rank, min(m, n))``."""
    stored = sum(stored_params(m, n, min(min_rank, m, n)) for m, n in shapes)
    return stored / sum(m * n for m, n in shapes)


def check_budget(shapes: Sequence[tuple[int, int]], budget: float, min_rank: int) -> None:
    """Raise ValueError when ``budget`` is below :func:`min_stored_fraction` (it cannot be met even at the lowest
    ranks allowed)."""
    lowest = min_stored_fraction(shapes, min_rank)
    if budget < lowest:
        raise ValueError(f"stored_budget={budget} cannot be met: with every converted layer at rank "
                         f"{min_rank} (min_rank) the factored layers still store {lowest:.6g} of the dense "
                         f"parameters they replace; raise stored_budget to at least {math.ceil(lowest * 1e4) / 1e4}, "
                         "lower min_rank, or convert fewer layers (exclude_modules)")


def allocate_ranks(values: Sequence[Tensor], shapes: Sequence[tuple[int, int]], budget: float,
                   floors: Sequence[int], caps: Sequence[int]) -> list[int]:
    """Ranks ``r_l`` for layers ``W_l (m_l×n_l)`` such that ``Σ_l r_l(m_l+n_l+r_l) <= budget · Σ_l m_l n_l``
    whenever the floors allow it, and ``floors[l] <= r_l <= caps[l]``. ``values[l]``: what each of layer ``l``'s
    singular components contributes, in the order a cut keeps them (a rank-``r`` cut keeps the first ``r``): the
    output scales ``t_i = s_i √E[(v_iᵀx)²]`` of :func:`oialr.output_sample.output_values`, or the singular values
    ``s_i`` where no output was recorded (inputs taken as isotropic).

    Cutting layer ``l`` to rank ``r`` loses the relative output energy ``e_l(r) = Σ_{i>=r} t_i² / Σ_i t_i²`` (the
    squared relative error of its output on the recorded rows), and the ranks minimise ``Σ_l e_l(r_l)²`` under the
    budget, greedily: from the floors, repeatedly grow the layer whose next block of values lowers the sum most per
    stored parameter, a block ``r → j`` scoring ``(e_l(r)² − e_l(j)²) / (j(m+n+j) − r(m+n+r))`` for the best ``j``
    that fits the room left (a block, not one value: with output scales a weak value can precede a strong one, and
    one value at a time would never reach it). A layer stops when its next value (:func:`marginal_cost`
    ``m+n+2r+1``) no longer fits; the room only shrinks, so at the end every layer below its cap is within one rank
    step of the budget: ``budget · Σ m n − stored < m_l+n_l+2r_l+1``. The square makes one large error cost more
    than several small ones, so no layer is starved; the cost per parameter keeps cheap layers (a first layer on raw
    pixels) whole.

    Measured by ``benchmarks/budget_rules.py`` (one-shot truncation of a model trained full-rank to its
    transition step, then its loss; lower is better; docs/results/budget_rules.md), this rule was the only one
    tried that never failed: test loss of the Fashion-MNIST ResNet-18 (dense 0.4930) at budgets 0.5 / 0.25 / 0.1
    0.4917 / 0.5095 / 0.6950; mini-ViT (0.8469) 0.8531 / 0.8859 / 0.9404; byte-level Llama, val bits per byte
    (2.5895), at 0.5 / 0.3 / 0.1 2.7198 / 2.8971 / 4.2136; the same rule on the singular values alone: ViT 2.7487 /
    2.7768 / 2.9200, Llama 4.8997 at 0.1.
    The rule before it (until 2026-12-03) minimised the largest ``e_l`` with ``t = s``: Llama 2.6991 / 2.8787 /
    4.5116, but ResNet-18 1.357 / 1.957 / 2.638 and mini-ViT 2.934 / 3.078 / 3.201, because it cut the cheap first
    layer (whose small singular directions carry the pixels' strongest inputs) as hard as the rest. The summed
    ``e_l`` per parameter (until 2026-12-02) starved the Llama's MLP (3.036 at 0.3).

    If the floors alone exceed the budget the floors are returned (the caller decides whether that is an error).
    """
    if not (len(values) == len(shapes) == len(floors) == len(caps)):
        raise ValueError("values, shapes, floors and caps must have one entry per layer")
    squared_errors = []                             # squared_errors[l][r] = e_l(r)², r = 0 … len(values[l])
    for t in values:
        energy = t.double() ** 2
        total = energy.sum()
        tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
        squared_errors.append(((tail / total) ** 2 if total > 0 else torch.zeros_like(tail)).tolist())
    caps = [min(c, len(t)) for c, t in zip(caps, values)]
    room = budget * sum(m * n for m, n in shapes) - sum(stored_params(m, n, f) for (m, n), f in zip(shapes, floors))
    ranks = list(floors)
    heap: list[tuple[float, int, int]] = []

    def push(layer: int) -> None:
        """Queue the layer's best block ``r → j`` among those that fit (none if its next value does not); the
        first ``j`` of the best rate (plain floats: a few hundred calls per allocation)."""
        (m, n), r, e2 = shapes[layer], ranks[layer], squared_errors[layer]
        best, best_j = -math.inf, None
        for j in range(r + 1, caps[layer] + 1):
            cost = stored_params(m, n, j) - stored_params(m, n, r)
            if cost > room:                         # the cost grows with j
                break
            if (rate := (e2[r] - e2[j]) / cost) > best:
                best, best_j = rate, j
        if best_j is not None:
            heapq.heappush(heap, (-best, layer, best_j))

    for layer in range(len(ranks)):
        push(layer)
    while heap:
        _, layer, j = heapq.heappop(heap)
        (m, n), r = shapes[layer], ranks[layer]
        if stored_params(m, n, j) - stored_params(m, n, r) <= room:
            room -= stored_params(m, n, j) - stored_params(m, n, r)
            ranks[layer] = j
        push(layer)                                 # its next block, or a smaller one if this no longer fits
    return ranks


def stored_fraction(shapes: Sequence[tuple[int, int]], ranks: Sequence[int]) -> float:
    """``Σ_l r_l(m_l+n_l+r_l) / Σ_l m_l n_l``: what the factored layers store against the dense weights."""
    return sum(stored_params(m, n, r) for (m, n), r in zip(shapes, ranks)) / sum(m * n for m, n in shapes)


def stored_fractions(shapes: Sequence[tuple[int, int]], budget: float | None, ranks: Sequence[int],
                     cut_ranks: Sequence[int]) -> dict[str, float | None]:
    """What :meth:`oialr.OIALR.summary` reports: ``stored_budget``; ``stored_fraction``, what the converted layers
    store now against their dense weights (1.0 before the transition, when ``ranks`` is empty);
    ``cut_stored_fraction``, the same at the ranks the last cut kept (lower than ``stored_fraction`` between updates
    with ``augment_bases``, which widens after the cut)."""
    return {"stored_budget": budget,
            "stored_fraction": stored_fraction(shapes, ranks) if ranks else 1.0,
            "cut_stored_fraction": stored_fraction(shapes, cut_ranks) if cut_ranks else 1.0}


def spectrum(matrix: Tensor) -> Tensor:
    """The singular values of a weight ``W (m×n)``, descending, computed in float32 or better: what
    :func:`transition_ranks` allocates from."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64 if matrix.dtype == torch.float64 else torch.float32))


def transition_ranks(spectra: Sequence[Tensor], shapes: Sequence[tuple[int, int]], config: OIALRConfig,
                     values: Sequence[Tensor] | None = None) -> list[int]:
    """The transition's ranks under ``config.stored_budget``, from each weight's singular values (:func:`spectrum`)
    and shape ``(m, n)``: per weight the floor is ``min(min_rank, min(m, n))`` and the cap what
    :func:`oialr.linalg.select_rank` keeps (``cutoff``, ``rank_fraction``); :func:`allocate_ranks` over ``values``
    (the output scales of the same components; the spectra when None)."""
    caps = [linalg.select_rank(s, cutoff=config.cutoff, max_rank=math.ceil(config.rank_fraction * s.numel()),
                               min_rank=config.min_rank) for s in spectra]
    floors = [min(config.min_rank, s.numel()) for s in spectra]
    return allocate_ranks(spectra if values is None else values, shapes, config.stored_budget, floors, caps)


def update_ranks(spectra: Sequence[Tensor], shapes: Sequence[tuple[int, int]], config: OIALRConfig,
                 values: Sequence[Tensor] | None = None) -> list[int]:
    """A basis update's ranks under ``config.stored_budget``, from each layer's singular values (the update's SVD
    of ``Σ``, :func:`oialr.factorize.rotation`) and the output scales ``values`` of the same components (the
    spectra when None): per layer at rank ``r = len(s)`` the floor is
    ``max(min_rank, r − floor(max_drop_fraction · r))`` (at most ``r``) and the cap what the cutoff keeps
    (:func:`oialr.factorize.cut_rank`).

    When the current ranks ``len(s)`` fit the budget, every layer gets its cap: the caps are at most the current
    ranks, so raising every layer from its floor to its cap costs no more than the room the allocation starts
    with, and every increment fits. The ranks exceed the budget only after growth (``augment_bases``); without it
    they only fall after the transition's allocation, so the controller allocates at an update only with growth."""
    floors = [min(s.numel(), max(config.min_rank, s.numel() - math.floor(config.max_drop_fraction * s.numel())))
              for s in spectra]
    caps = [cut_rank(s, config) for s in spectra]
    return allocate_ranks(spectra if values is None else values, shapes, config.stored_budget, floors, caps)
