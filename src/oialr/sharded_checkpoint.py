"""Checkpoints of a model sharded by FSDP2 and its optimizer, with ``torch.distributed.checkpoint`` (DCP): each
process writes its own shards, no process ever holds the whole model.

A checkpoint is a folder: DCP's files (``.metadata`` and one ``__<rank>_0.distcp`` per process) holding the model's
and the optimizer's state dicts (``torch.distributed.checkpoint.state_dict.get_state_dict``: keys are parameter
names, so the optimizer state is found again whatever the Parameter objects), and ``extra.pt``, the plain values
process 0 was given (the controller's ``state_dict()``, a step counter). It is written to ``<folder>.tmp`` and
renamed to ``<folder>`` by process 0 once every process has written its part, so a folder that exists is
complete; a crash leaves at most a ``.tmp`` folder, which the next :func:`save_sharded` to that name replaces.

Restoring an OIALR run: build the model, shard it (:func:`oialr.sharding.shard_targets`), the optimizer and the
controller as in the saved run, then ``ctl.load_state_dict(read_extra(folder)["controller"])`` (the factored
layers get the saved ranks, so every shape matches) and :func:`load_sharded`.

DCP stores every tensor with its global shape and the rows each file holds, and reads back whatever rows each
process now owns: a checkpoint written by N processes loads into M (tested for 2 → 1 and 1 → 2 in
``tests/test_fsdp.py``).
"""
from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from . import distributed, files

EXTRA = "extra.pt"


def save_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, Any] | None = None) -> None:
    """Every process: write ``model``'s and ``optimizer``'s shards and, from process 0, ``extra`` (plain values)
    into the new folder ``folder`` (refused if it exists: save each checkpoint under a new name, e.g. by step, and
    delete the older ones once it is written)."""
    if os.path.exists(folder):
        raise FileExistsError(f"checkpoint folder {folder} exists; save under a new name (e.g. with the step) and "
                              "delete older checkpoints after the new one is written")
    tmp = folder + ".tmp"
    if distributed.is_source() and os.path.exists(tmp):
        shutil.rmtree(tmp)                      # a save that crashed before its rename
    distributed.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _one_process_is_fine():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if distributed.is_source():
        files.save_torch(os.path.join(tmp, EXTRA), extra or {})
        os.replace(tmp, folder)
    distributed.barrier()


def read_extra(folder: str) -> dict[str, Any]:
    """The plain values :func:`save_sharded` was given (read by every process)."""
    return torch.load(os.path.join(folder, EXTRA), map_location="cpu", weights_only=True)


def load_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process: load the shards of ``folder`` into ``model`` and ``optimizer`` (in place; same shapes as the
    saved run, see the module docstring). Optimizer entries without state in the saved run get none here either."""
    model_state, optim_state = get_state_dict(model, optimizer)     # the template: names, shapes, shards
    saved = set(dcp.FileSystemReader(folder).read_metadata().state_dict_metadata)
    optim_state["state"] = {name: kept for name, entry in optim_state["state"].items()
                            if (kept := {key: value for key, value in entry.items()
                                         if f"optimizer.state.{name}.{key}" in saved})}
    with _one_process_is_fine():
        dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder)
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(strict=False))


@contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: it is the intended case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
