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

    The rule spreads the error evenly: cutting ``W_l`` to rank ``r`` loses the relative energy
    ``e_l(r) = Σ_{i>=r} s_i² / Σ_i s_i²`` (its squared relative Frobenius error), and the ranks minimise the largest
    ``e_l`` of any layer under the budget. Greedily (:func:`greedy_ranks`): from the floors, repeatedly give one more
    value to the layer with the largest ``e_l(r_l)`` while its :func:`marginal_cost` ``m+n+2r+1`` fits, so every
    layer keeps about the same share of its energy (the energy analogue of ``cutoff``, which keeps every layer's
    values above the same share of ``s_1``); ``e_l`` only falls with ``r``, so each layer keeps a prefix of its
    spectrum. A layer whose next value does not fit never grows again (the room left only shrinks), so at the end
    every layer below its cap is within one rank step of the budget: ``budget · Σ m n − stored < m_l+n_l+2r_l+1``.

    Why not the sum ``Σ_l e_l``, i.e. values ranked by ``s_i²/Σ s²`` per stored parameter (this rule until
    2026-12-02): it starves layers with a flat spectrum and a high cost per value. On the byte-level Llama of
    ``configs/lm_llama.yaml`` it cut the MLP projections (1024×384) to ranks 29-42 at a budget of 0.3 while the
    attention projections kept 89-118, and training then trailed full-rank by 3%. Measured by
    ``benchmarks/budget_rules.py`` (one-shot truncation of a trained model, then its loss; lower is better), this
    rule against the sum: the Llama after 720 full-rank steps (val bits per byte; dense 2.5895) 2.8787 vs 3.0363 at
    0.3 (one rank fraction for all: 2.9214), 4.5116 vs 5.6508 at 0.1; MNIST-1D MLP (test loss; dense 0.952) 0.963
    vs 0.974 at 0.5, 1.001 vs 1.001 at 0.25, 1.958 vs 1.248 at 0.1; MNIST-1D CNN (dense 0.098) 0.104 vs 0.098 at
    0.5, 0.118 vs 0.097 at 0.25, 1.623 vs 0.804 at 0.1. It loses on the small MNIST-1D models at deep cuts, where
    the sum keeps a narrow first layer whole, and wins where most parameters sit in wide layers with flat spectra,
    as in transformers. Weighting each layer by its size (``m·n · s_i²/Σ s²`` per parameter) did as well on the
    Llama (2.8875, 4.4691) but cut the MLP's narrow input layer to rank 1 at 0.1 (test loss 7.3); the loss
    increase predicted from Adam's second moments (``s_i²`` times the Fisher diagonal in the singular basis) gave
    the Llama ranks from 1 to 202 and 3.3649 at 0.3.

    If the floors alone exceed the budget the floors are returned (the caller decides whether that is an error).
    """
    if not (len(spectra) == len(shapes) == len(floors) == len(caps)):
        raise ValueError("spectra, shapes, floors and caps must have one entry per layer")
    residuals = []                                  # residuals[l][i] = e_l(i): the energy share beyond the first i
    for s in spectra:
        squares = s.double() ** 2
        total = squares.sum()
        tail = squares.flip(0).cumsum(0).flip(0)
        residuals.append((tail / total if total > 0 else torch.zeros_like(tail)).tolist())

    def score(layer: int, i: int) -> float:
        return residuals[layer][i]

    return greedy_ranks(score, shapes, budget, floors, [min(c, len(e)) for c, e in zip(caps, residuals)])


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


def spectrum(matrix: Tensor) -> Tensor:
    """The singular values of a weight ``W (m×n)``, descending, computed in float32 or better: what
    :func:`transition_ranks` allocates from."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64 if matrix.dtype == torch.float64 else torch.float32))


def transition_ranks(spectra: Sequence[Tensor], shapes: Sequence[tuple[int, int]], config: OIALRConfig) -> list[int]:
    """The transition's ranks under ``config.stored_budget``, from each weight's singular values (:func:`spectrum`)
    and shape ``(m, n)``: per weight the floor is ``min(min_rank, min(m, n))`` and the cap what
    :func:`oialr.linalg.select_rank` keeps (``cutoff``, ``rank_fraction``); :func:`allocate_ranks` over the spectra."""
    caps = [linalg.select_rank(s, cutoff=config.cutoff, max_rank=math.ceil(config.rank_fraction * s.numel()),
                               min_rank=config.min_rank) for s in spectra]
    floors = [min(config.min_rank, s.numel()) for s in spectra]
    return allocate_ranks(spectra, shapes, config.stored_budget, floors, caps)


def update_ranks(spectra: Sequence[Tensor], shapes: Sequence[tuple[int, int]], config: OIALRConfig) -> list[int]:
    """A basis update's ranks under ``config.stored_budget``, from each layer's singular values (the update's SVD
    of ``Σ``, :func:`oialr.factorize.rotation`): per layer at rank ``r = len(s)`` the floor is
    ``max(min_rank, r − floor(max_drop_fraction · r))`` (at most ``r``) and the cap what the cutoff keeps
    (:func:`oialr.factorize.cut_rank`).

    When the current ranks ``len(s)`` fit the budget, every layer gets its cap: the caps are at most the current
    ranks, so raising every layer from its floor to its cap costs no more than the room :func:`greedy_ranks` starts
    with, and every increment fits. The ranks exceed the budget only after growth (``augment_bases``); without it
    they only fall after the transition's allocation, so the controller allocates at an update only with growth."""
    floors = [min(s.numel(), max(config.min_rank, s.numel() - math.floor(config.max_drop_fraction * s.numel())))
              for s in spectra]
    caps = [cut_rank(s, config) for s in spectra]
    return allocate_ranks(spectra, shapes, config.stored_budget, floors, caps)
