"""A size budget: the ranks of all factored layers chosen together so that they store at most a given fraction of the
dense parameters they replace (pure functions over singular values and shapes)."""
from __future__ import annotations

import heapq
import math
from typing import Callable, Sequence

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


def allocate_ranks(spectra: Sequence[Tensor], shapes: Sequence[tuple[int, int]], budget: float,
                   floors: Sequence[int], caps: Sequence[int]) -> list[int]:
    """Ranks ``r_l`` for layers ``W_l (m_l×n_l)`` with singular values ``spectra[l]`` (descending), such that
    ``Σ_l r_l(m_l+n_l+r_l) <= budget · Σ_l m_l n_l`` whenever the floors allow it, and ``floors[l] <= r_l <= caps[l]``.

    The rule keeps the singular values that carry the most of their layer's energy per stored parameter. Cutting
    ``W_l`` to rank ``r`` loses the relative energy ``e_l(r) = Σ_{i>r} s_i² / Σ_i s_i²`` (its squared relative
    Frobenius error); we minimise ``Σ_l e_l(r_l)`` under the budget. Value ``i`` (0-based, ``i = r_l``) of layer
    ``l`` is worth ``s_i² / Σ_j s_j²`` and costs :func:`marginal_cost` ``m+n+2i+1``; its score is their ratio.
    Within a layer scores fall with ``i`` (values descend, costs rise), so a greedy pass over one global ranking
    keeps a prefix of every spectrum: start at the floors, repeatedly take the best-scoring next value that still
    fits. A layer whose next value does not fit never grows again (its later values cost more and the room left
    only shrinks), so at the end every layer below its cap is within one rank step of the budget:
    ``budget · Σ m n − stored < m_l + n_l + 2 r_l + 1``. Normalising by each layer's energy makes layers of
    different scale comparable (the same scale-free view as ``cutoff``, which compares ``s_i`` with ``s_1``).
    Measured (``benchmarks/budget_rules.py``: one-shot truncation of trained MNIST-1D models), it gave the lowest
    test loss at budgets 0.5/0.25/0.1 but one (CNN at 0.1: 0.666 vs 0.637 for ranking ``s_i/s_1`` without costs),
    where ``s_i/s_1`` per parameter lost up to 3.5× (CNN at 0.1: 2.35) and one rank fraction for all layers failed.

    If the floors alone exceed the budget the floors are returned (the caller decides whether that is an error).
    """
    if not (len(spectra) == len(shapes) == len(floors) == len(caps)):
        raise ValueError("spectra, shapes, floors and caps must have one entry per layer")
    squares = [(s.double() ** 2).tolist() for s in spectra]
    energies = [sum(sq) for sq in squares]

    def score(layer: int, i: int) -> float:
        worth = squares[layer][i] / energies[layer] if energies[layer] > 0 else 0.0
        return worth / marginal_cost(*shapes[layer], i)

    return greedy_ranks(score, shapes, budget, floors, [min(c, len(sq)) for c, sq in zip(caps, squares)])


def greedy_ranks(score: Callable[[int, int], float], shapes: Sequence[tuple[int, int]], budget: float,
                 floors: Sequence[int], caps: Sequence[int]) -> list[int]:
    """The greedy pass of :func:`allocate_ranks` for any ``score(layer, i)`` of value ``i`` of a layer (which should
    not increase with ``i``): from the floors, repeatedly grow the layer whose next value scores best while its
    :func:`marginal_cost` fits the room left under ``budget · Σ m n``; a layer that does not fit stops growing."""
    room = budget * sum(m * n for m, n in shapes) - sum(stored_params(m, n, f) for (m, n), f in zip(shapes, floors))
    ranks = list(floors)
    heap: list[tuple[float, int]] = []

    def push(layer: int) -> None:
        if ranks[layer] < caps[layer]:
            heapq.heappush(heap, (-score(layer, ranks[layer]), layer))

    for layer in range(len(ranks)):
        push(layer)
    while heap:
        _, layer = heapq.heappop(heap)
        cost = marginal_cost(*shapes[layer], ranks[layer])
        if cost <= room:
            room -= cost
            ranks[layer] += 1
            push(layer)
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


def transition_ranks(matrices: Sequence[Tensor], config: OIALRConfig) -> list[int]:
    """The transition's ranks under ``config.stored_budget``: per weight ``W (m×n)`` the floor is
    ``min(min_rank, min(m, n))`` and the cap what :func:`oialr.linalg.select_rank` keeps (``cutoff``,
    ``rank_fraction``); :func:`allocate_ranks` over the singular values (float32 or better)."""
    spectra = [torch.linalg.svdvals(w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32))
               for w in matrices]
    caps = [linalg.select_rank(s, cutoff=config.cutoff, max_rank=math.ceil(config.rank_fraction * s.numel()),
                               min_rank=config.min_rank) for s in spectra]
    floors = [min(config.min_rank, s.numel()) for s in spectra]
    return allocate_ranks(spectra, [tuple(w.shape) for w in matrices], config.stored_budget, floors, caps)


def update_ranks(spectra: Sequence[Tensor], shapes: Sequence[tuple[int, int]], config: OIALRConfig) -> list[int]:
    """A basis update's ranks under ``config.stored_budget``, from each layer's singular values (the update's SVD
    of ``Σ``, :func:`oialr.factorize.rotation`): per layer at rank ``r = len(s)`` the floor is
    ``max(min_rank, r − floor(max_drop_fraction · r))`` (at most ``r``) and the cap what the cutoff keeps
    (:func:`oialr.factorize.cut_rank`)."""
    floors = [min(s.numel(), max(config.min_rank, s.numel() - math.floor(config.max_drop_fraction * s.numel())))
              for s in spectra]
    caps = [cut_rank(s, config) for s in spectra]
    return allocate_ranks(spectra, shapes, config.stored_budget, floors, caps)
