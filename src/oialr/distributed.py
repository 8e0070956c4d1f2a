"""Keeping OIALR's factors identical on every process under ``torch.distributed``, and the few collectives around it.

Every function is a no-op (or returns its input) when no process group of more than one process is initialised,
so single-process training never touches ``torch.distributed``. The design is in ``docs/DISTRIBUTED.md``:
the source process (rank 0) computes every SVD and broadcasts the result (factors, ranks, rotations), because
SVDs are not bitwise reproducible across devices, libraries and thread counts; a sign flip of one singular vector
on one process would give it a different ``U`` for the same ``W``.

Communication per layer ``W (m×n)``, rank ``r`` before and ``k`` after an update (float32 parameters):
    transition:     4·k·(m + n + k) bytes (``U``, ``Σ``, ``V``) + 8 bytes (the rank)
    basis update:   4·k·(m + n + k) + 8·2·r² bytes (``u``, ``v`` in float64, for the optimizer state) + 8 bytes
each packed into one buffer per dtype, i.e. three broadcasts per update whatever the number of layers.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layers import LowRankLayer

SOURCE = 0                    # the rank whose SVD results every process adopts
Update = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]     # U (m×k), Σ (k×k), V (n×k), u (r×r), v (r×r)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_source() -> bool:
    """True on the process that computes the SVDs, writes files and prints (the only process when not distributed)."""
    return rank() == SOURCE


def device() -> torch.device:
    """This process's device for collectives and training: ``cuda:<current>`` under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------- collectives
@torch.no_grad()
def broadcast_(tensors: Sequence[Tensor]) -> None:
    """Overwrite ``tensors`` in place with the source's values: one broadcast per (dtype, device) of a flat buffer.
    Every process passes tensors of the same shapes and dtypes in the same order."""
    if not is_distributed():
        return
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, SOURCE)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_ints(values: Sequence[int]) -> list[int]:
    """The source's ``values`` on every process (all pass sequences of the same length)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.int64, device=device())
    dist.broadcast(t, SOURCE)
    return t.tolist()


def broadcast_object(obj):
    """The source's ``obj`` (a small picklable value, e.g. a decision) on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, SOURCE, device=device())
    return box[0]


def all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """Elementwise ``sum`` or ``max`` of ``values`` over the processes (float64: integers up to 2⁵³ stay exact)."""
    if not is_distributed():
        return list(values)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op must be one of {', '.join(ops)}, got {op!r}")
    t = torch.tensor(list(values), dtype=torch.float64, device=device())
    dist.all_reduce(t, ops[op])
    return t.tolist()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------- factors
@torch.no_grad()
def broadcast_factors(layers: Sequence[LowRankLayer]) -> None:
    """Give every layer the source's rank and ``U``, ``Σ``, ``V`` (after the transition's SVDs). A layer whose rank
    differs from the source's gets new Parameter objects of the source's shapes first."""
    if not is_distributed():
        return
    ranks = broadcast_ints([layer.rank for layer in layers])
    for layer, r in zip(layers, ranks):
        if layer.rank != r:
            (m, n), ref = layer.matrix_shape, layer.lowrank_S
            layer.set_factors(ref.new_zeros(m, r), ref.new_zeros(r, r), ref.new_zeros(n, r))
    broadcast_([t for layer in layers for t in (layer.lowrank_U, layer.lowrank_S, layer.lowrank_V)])


@torch.no_grad()
def broadcast_updates(updates: Sequence[Update | None] | None, layers: Sequence[LowRankLayer]) -> list[Update | None]:
    """The source's basis updates on every process.

    ``updates`` (read on the source only; pass ``None`` elsewhere): per layer ``(U', Σ', V', u, v)`` with
    ``U' (m×k)``, ``Σ' (k×k)``, ``V' (n×k)`` and the rotations ``u``, ``v`` (``r×r``), or ``None`` for a layer whose
    update is skipped. Returned on every process, the source included: the factors in the parameter dtype (the
    values the layer stores) and ``u``, ``v`` in float64, so every process applies the very same numbers.
    """
    if not is_distributed():
        return list(updates)
    source = is_source()
    ks = broadcast_ints([0 if up is None else up[1].shape[0] for up in updates] if source else [0] * len(layers))
    out: list[Update | None] = []
    for i, (layer, k) in enumerate(zip(layers, ks)):
        if k == 0:
            out.append(None)
            continue
        (m, n), r, ref = layer.matrix_shape, layer.rank, layer.lowrank_S
        if source:
            U, S, V, u, v = updates[i]
            out.append((U.to(ref).contiguous(), S.to(ref).contiguous(), V.to(ref).contiguous(),
                        u.double().contiguous(), v.double().contiguous()))
        else:
            rot = dict(dtype=torch.float64, device=ref.device)
            out.append((ref.new_empty(m, k), ref.new_empty(k, k), ref.new_empty(n, k),
                        torch.empty(r, r, **rot), torch.empty(r, r, **rot)))
    broadcast_([t for up in out if up is not None for t in up])
    return out


# ---------------------------------------------------------------------------------------------------- checks
def fingerprint(tensors: Iterable[Tensor]) -> int:
    """An integer that changes when a shape or a single bit of ``tensors`` changes, for checking that processes hold
    identical values: ``h ← 31·h + Σ_i b_i·(i mod 65521 + 1) + |shape|`` over the bytes ``b_i`` of each tensor,
    modulo the prime ``2⁶¹ − 1`` (fits an int64)."""
    h = 0
    for t in tensors:
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).to(torch.int64)
        weights = torch.arange(data.numel(), dtype=torch.int64) % 65521 + 1
        shape = sum((d + 1) * 1000003 ** j for j, d in enumerate(t.shape))
        h = (31 * h + int((data * weights).sum()) + shape) % (2 ** 61 - 1)
    return h


def factor_fingerprint(model: nn.Module) -> int:
    """:func:`fingerprint` of every factored layer's ``U``, ``Σ``, ``V`` (shapes, hence ranks, included)."""
    return fingerprint(t for m in model.modules() if isinstance(m, LowRankLayer)
                       for t in (m.lowrank_U, m.lowrank_S, m.lowrank_V))


def all_equal(value: int) -> bool:
    """True when every process passed the same integer (e.g. a :func:`fingerprint`)."""
    if not is_distributed():
        return True
    t = torch.tensor([-value, value], dtype=torch.int64, device=device())
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return -t[0].item() == t[1].item()


# ---------------------------------------------------------------------------------------------------- setup
def ddp(module: nn.Module) -> nn.Module:
    """``DistributedDataParallel(module)``, with ``device_ids`` when ``module`` is on a GPU. ``U`` and ``V`` have
    ``requires_grad=False``, so DDP neither syncs nor waits for them; ``find_unused_parameters`` stays off."""
    where = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[where.index] if where.type == "cuda" else None)


@contextmanager
def process_group_from_env() -> Iterator[None]:
    """Initialise the default process group from torchrun's variables when ``WORLD_SIZE > 1`` (NCCL when CUDA is
    available, else gloo) and destroy it on exit; with ``WORLD_SIZE`` unset or 1, do nothing."""
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if env["WORLD_SIZE"] in (None, "", "1") or dist.is_initialized():
        yield
        return
    bad = [f"{k}={v!r}" for k, v in env.items() if v is None or not v.isdigit()]
    if bad:
        raise RuntimeError(f"distributed run: expected integer WORLD_SIZE, RANK and LOCAL_RANK in the environment, "
                           f"found {', '.join(bad)}; launch with torchrun --nproc-per-node N -m oialr ...")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()
