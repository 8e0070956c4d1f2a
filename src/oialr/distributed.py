"""Keeping OIALR's factors identical on every process under ``torch.distributed``, and the few collectives around it.

Every function is a no-op (or returns its input) when no process group of more than one process is initialised,
so single-process training never touches ``torch.distributed``. The design is in ``docs/DISTRIBUTED.md``:
the source process (process 0) computes every SVD and broadcasts the result (factors, ranks, rotations), because
SVDs are not bitwise reproducible across devices, libraries and thread counts; a sign flip of one singular vector
on one process would give it a different ``U`` for the same ``W``.

Communication per layer ``W (m×n)``, rank ``r`` before and ``k`` after an update (float32 parameters):
    transition:     4·k·(m + n + k) bytes (``U``, ``Σ``, ``V``) + 8 bytes (the rank)
    basis update:   4·k·(m + n + k) + 8·4·r² bytes (``u``, ``v``, ``R_U``, ``R_V`` in float64, for the optimizer
                    state) + 8 bytes
each packed into one buffer per dtype, i.e. three broadcasts per update whatever the number of layers.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .factorize import BasisUpdate, Factors

SOURCE = 0                    # the process whose SVD results every process adopts


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_rank() -> int:
    """This process's index in the process group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_source() -> bool:
    """True on the process that computes the SVDs, writes files and prints (the only process when not distributed)."""
    return process_rank() == SOURCE


def device() -> torch.device:
    """This process's device for collectives and training: ``cuda:<current>`` under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------- collectives
@torch.no_grad()
def _per_buffer(tensors: Sequence[Tensor], collective) -> None:
    """Run ``collective`` on one flat buffer per (dtype, device) of ``tensors`` and copy the result back."""
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_(tensors: Sequence[Tensor]) -> None:
    """Overwrite ``tensors`` in place with the source's values: one broadcast per (dtype, device) of a flat buffer.
    Every process passes tensors of the same shapes and dtypes in the same order."""
    if is_distributed():
        _per_buffer(tensors, lambda flat: dist.broadcast(flat, SOURCE))


def sum_to_source_(tensors: Sequence[Tensor]) -> None:
    """Replace ``tensors`` on the source by their sum over the processes (one reduce per (dtype, device) of a flat
    buffer; the other processes' tensors are left undefined). Every process passes the same shapes and dtypes."""
    if is_distributed():
        _per_buffer(tensors, lambda flat: dist.reduce(flat, SOURCE))


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


def all_gather(values: Sequence[float]) -> list[list[float]]:
    """Every process's ``values`` in process order (all pass sequences of the same length; float64)."""
    if not is_distributed():
        return [list(values)]
    t = torch.tensor(list(values), dtype=torch.float64, device=device())
    gathered = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(gathered, t)
    return [g.tolist() for g in gathered]


@torch.no_grad()
def gather_rows(rows: Tensor | None, width: int) -> Tensor | None:
    """Every process's ``rows (k_p×width)`` (float32; None: this process has none) stacked in process order on the
    source; None on the other processes, and where no process has rows. Every process calls it."""
    if not is_distributed():
        return rows
    counts = [int(c[0]) for c in all_gather([0 if rows is None else rows.shape[0]])]
    if max(counts) == 0:
        return None
    padded = torch.zeros(max(counts), width, dtype=torch.float32, device=device())
    if rows is not None:
        padded[:rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)]) if is_source() else None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------- factors
@torch.no_grad()
def broadcast_factors(factors: Factors | None, shape: tuple[int, int], like: Tensor) -> Factors:
    """The source's transition factors of one ``m×n`` weight on every process (``factors`` is read on the source
    only; pass ``None`` elsewhere), in ``like``'s dtype and device: the rank first, then ``U``, ``Σ``, ``V``."""
    if not is_distributed():
        return factors
    (m, n), source = shape, is_source()
    r = broadcast_ints([factors.S.shape[0] if source else 0])[0]
    out = Factors(*(t.to(like).contiguous() for t in factors)) if source else Factors(
        like.new_empty(m, r), like.new_empty(r, r), like.new_empty(n, r))
    broadcast_(out)
    return out


@torch.no_grad()
def broadcast_updates(updates: Sequence[BasisUpdate | None] | None, shapes: Sequence[tuple[int, int, int]],
                      like: Tensor, with_R: bool = False) -> list[BasisUpdate | None]:
    """The source's basis updates on every process.

    ``updates`` (read on the source only; pass ``None`` elsewhere): per layer a :class:`BasisUpdate` or ``None``
    for a layer whose update is skipped; ``shapes``: per layer ``(m, n, r)``, its matrix shape and current rank.
    Returned on every process, the source included: the factors in ``like``'s dtype (the values the layer stores)
    and ``u``, ``v`` in float64, so every process applies the very same numbers; ``R_U``, ``R_V`` too (float64)
    with ``with_R`` (trained bases, whose optimizer state needs them; 16·r² more bytes per layer), else ``None``.
    """
    if not is_distributed():
        return [up if up is None or with_R else up._replace(R_U=None, R_V=None) for up in updates]
    source = is_source()
    ks = broadcast_ints([0 if up is None else up.S.shape[0] for up in updates] if source else [0] * len(shapes))
    rot = dict(dtype=torch.float64, device=like.device)
    maps = 4 if with_R else 2
    out: list[BasisUpdate | None] = []
    for i, ((m, n, r), k) in enumerate(zip(shapes, ks)):
        if k == 0:
            out.append(None)
            continue
        if source:
            U, S, V, *rest = updates[i]
            factors = [t.to(like).contiguous() for t in (U, S, V)]
            rest = [t.double().contiguous() for t in rest[:maps]]
        else:
            factors = [like.new_empty(m, k), like.new_empty(k, k), like.new_empty(n, k)]
            rest = [torch.empty(r, r, **rot) for _ in range(maps)]
        out.append(BasisUpdate(*factors, *rest, *(None,) * (4 - maps)))
    broadcast_([t for up in out if up is not None for t in up if t is not None])
    return out


# ---------------------------------------------------------------------------------------------------- setup
def ddp(module: nn.Module) -> nn.Module:
    """``DistributedDataParallel(module)``, with ``device_ids`` when ``module`` is on a GPU. ``U`` and ``V`` have
    ``requires_grad=False`` (unless ``train_bases``), so DDP neither syncs nor waits for them;
    ``find_unused_parameters`` stays off."""
    where = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[where.index] if where.type == "cuda" else None)


@contextmanager
def process_group_from_env(timeout: float | None = None) -> Iterator[None]:
    """Initialise the default process group from torchrun's variables when ``WORLD_SIZE > 1`` (NCCL when CUDA is
    available, else gloo) and destroy it on exit; with ``WORLD_SIZE`` unset or 1, do nothing. ``timeout``: seconds
    a collective waits for the other processes before it raises (``None``: torch's default, 10 to 30 minutes)."""
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
    dist.init_process_group(backend, timeout=None if timeout is None else datetime.timedelta(seconds=timeout))
    try:
        yield
    finally:
        dist.destroy_process_group()
