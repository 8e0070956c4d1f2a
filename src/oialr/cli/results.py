"""The results dict of a finished training run (``results.json``): the headline metrics, parameter counts, time,
memory, the transition and final ranks, and the full config."""
from __future__ import annotations

import resource
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed
from . import tasks
from .reporting import optimizer_state_params

if TYPE_CHECKING:
    from .run import TrainingRun


def run_results(run: TrainingRun, compact_params: int) -> dict[str, Any]:
    """``run``'s results, with ``compact_params`` the parameters of its model as plain torch layers
    (:func:`oialr.compact_lowrank`). Distributed: every process calls this (the peak memory is the largest
    process's)."""
    final = run.metrics[-1] if run.metrics else {}
    summary = run.controller.summary() if run.controller is not None else None
    text = tasks.is_text(run.data)
    return {
        **tasks.headline(run.data, run.metrics),
        "method": run.cfg.method, "dataset": run.cfg.dataset, "model": run.cfg.model,
        "epochs": run.epoch, "steps": run.step,
        "trainable_params": final.get("trainable_params"), "dense_params": run.dense_params,
        "stored_params": final.get("stored_params"),
        "compact_params": compact_params,
        "train_seconds": run.train_seconds,
        **(tasks.throughput(run.phase_seconds, run.phase_samples) if text else {}),
        **({"optimizer_state_params": optimizer_state_params(run.optimizer), "data": run.data.info()}
           if text else {}),
        "peak_rss_mb": distributed.all_reduce(      # the largest process
            [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], op="max")[0],
        "world_size": run.world_size,
        "stability_overhead": None if run.tracker is None else run.tracker.overhead,   # since this start
        "transition_step": summary["transition_step"] if summary else None,
        "transition_reason": summary["transition_reason"] if summary else None,
        **{k: summary.get(k) if summary else None for k in ("stored_budget", "stored_fraction", "cut_stored_fraction")},
        "layers": summary["layers"] if summary else {},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": run.cfg.to_dict(),
    }
