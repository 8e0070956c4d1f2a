"""TrainingRun: one training run (full-rank, OIALR or a peer method) from setup to results, with exact, crash-safe
resume; single-process or one process of a ``torchrun`` job (``docs/DISTRIBUTED.md``). Started, new or resumed,
by :func:`oialr.cli.start.start_or_resume`."""
from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import time
from typing import Any

import torch
from torch import nn

from .. import OIALR, StabilityTracker, compact_lowrank, distributed, files, structure
from . import tasks
from .checkpoint import CHECKPOINT
from .data import load_dataset
from .evaluation import evaluate
from .failures import Diverged
from .interrupts import STOP_POLL_EVERY, Interrupted, stop_signals_to
from .methods import build_optimizer, peer_controller
from .models import build_model, option_problems
from .reporting import RunFiles, param_stats, progress
from .results import run_results
from .run_folder import RunFolder
from .running_sums import RunningSums
from .schedule import learning_rate
from .settings import ConfigError, TrainConfig


class TrainingRun:
    """Set up data, model, optimizer and the method's controller (OIALR, or a peer's from ``methods``); train;
    write results to ``out``.

    Files in ``out``: ``checkpoint.pt`` (every epoch, every ``eval_every`` steps and on interrupt),
    ``metrics.jsonl``/``metrics.csv`` (one row per evaluation: every epoch, and every ``eval_every`` steps),
    ``results.json``, ``model/`` and ``compact/`` (safetensors, :func:`oialr.save_pretrained`) and the plots (at the
    end), TensorBoard events when tensorboard is installed.

    Under ``torch.distributed`` every process runs this with the same settings: each trains on its shard of every
    global batch (``batch_size / world_size`` samples) through DDP, or with ``parallel: fsdp`` through the FSDP2
    layout of :func:`oialr.sharding.shard_targets`; sums of metrics are all-reduced, and rank 0 alone writes files
    and logs while the others wait at a barrier. With ``parallel: fsdp`` the checkpoint's model and optimizer are
    a ``torch.distributed.checkpoint`` folder next to ``checkpoint.pt`` (:mod:`oialr.sharded_checkpoint`).
    """

    def __init__(self, cfg: TrainConfig, out: str, *, log=print):
        self.cfg, self.out = cfg, out
        self.rank, self.world_size = distributed.process_rank(), distributed.world_size()
        self.log = log if self.rank == 0 else (lambda *args, **kwargs: None)
        self.epoch = 0                 # completed epochs
        self.batch_in_epoch = 0        # batches of the current epoch already trained (resume mid-epoch)
        self.step = 0                  # optimizer steps
        self.train_seconds = 0.0
        self.phase_seconds = {phase: 0.0 for phase in tasks.PHASES}   # training steps' time and samples (tokens
        self.phase_samples = {phase: 0 for phase in tasks.PHASES}     # for text) in each phase, all processes
        self.metrics: list[dict] = []
        self._stop_signal: int | None = None
        self.folder: RunFolder | None = None      # rank 0's claim on ``out``, released when train() ends
        self.sharded = cfg.parallel == "fsdp" and self.world_size > 1

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.batch_size % self.world_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must be divisible by the "
                              f"{self.world_size} processes; choose a multiple of {self.world_size}, e.g. "
                              f"{cfg.batch_size - cfg.batch_size % self.world_size or self.world_size}")
        problems = option_problems(cfg.model, cfg.model_args)
        if problems:
            raise ConfigError("; ".join(problems))
        torch.manual_seed(cfg.seed)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        torch.set_flush_denormal(True)     # denormals in Adam's moments slow CPU training up to tenfold
        self.data = load_dataset(cfg.dataset, cfg.data_dir, context_length=cfg.context_length)
        self.train_loader, self.test_loader = tasks.make_loaders(self.data, cfg, self.rank, self.world_size)
        if len(self.train_loader) == 0:
            raise ConfigError(f"the training split has {self.train_loader.num_samples} samples per process, fewer "
                              f"than one batch of {cfg.batch_size // self.world_size}; use a smaller batch_size")
        self.device = distributed.device()
        try:
            self.model = build_model(cfg.model, self.data.input_shape, self.data.num_classes, **cfg.model_args)
        except ImportError as err:                 # an optional package (timm, transformers) is missing
            raise ConfigError(str(err)) from None
        except ValueError as err:                  # model_args that do not fit this model or data
            raise ConfigError(f"model {cfg.model!r} cannot be built with model_args {cfg.model_args}: {err}") from None
        self.model.to(self.device)               # the CPU, or this process's GPU under NCCL
        self.sums = RunningSums(self.device)
        self.dense_params = sum(p.numel() for p in self.model.parameters())
        shard = _sharded(self.model, cfg) if self.sharded else None   # before the optimizer: new Parameters
        self.optimizer = build_optimizer(cfg, self.model)
        wrap = distributed.ddp if self.world_size > 1 and not self.sharded else None
        if cfg.compile:
            wrap = _compiled(wrap)
        self.tracker = None if cfg.stability_every is None or self.rank != 0 else StabilityTracker(
            self.model, every=cfg.stability_every, cutoff=cfg.oialr.cutoff, mixing=True, lag=cfg.stability_lag)
        self.total_steps = cfg.epochs * len(self.train_loader)
        warmup = cfg.oialr.warmup_for(self.total_steps)
        if cfg.method == "oialr" and warmup != "auto" and warmup >= self.total_steps:
            raise ConfigError(f"oialr.warmup_steps={warmup} is not reached before the run ends: {cfg.epochs} epochs "
                              f"x {len(self.train_loader)} steps = {self.total_steps} optimizer steps, so OIALR would "
                              "train full-rank throughout; give fewer steps, a fraction of the run (--set "
                              "oialr.warmup_steps=0.2) or more epochs")
        auto = warmup == "auto"                         # its transition reads the run's series when there is one
        self.controller = OIALR(self.model, self.optimizer, cfg.oialr, wrap=wrap, total_steps=self.total_steps,
                                tracker=self.tracker if auto else None, shard=shard) if cfg.method == "oialr" \
            else peer_controller(cfg, self.model, self.optimizer, wrap)
        self._net = self.model if wrap is None or self.controller is not None else wrap(self.model)
        self.lr_warmup_steps = round(cfg.lr_warmup_epochs * len(self.train_loader))
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    @property
    def net(self) -> nn.Module:
        """The module the training step calls: the DDP wrapper under torch.distributed (the controller's, rebuilt
        when parameter shapes change), else the model itself."""
        return self.controller.wrapped_model if self.controller is not None else self._net

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, epoch_sums: dict[str, list] | None = None, sharded: str | None = None) -> dict[str, Any]:
        """Everything to resume exactly; ``epoch_sums``: every process's training sums since the last metrics row,
        ``{"loss": [per process], "correct": [...], "seen": [...]}`` (:meth:`RunningSums.gathered`). ``sharded``:
        the folder (in ``out``) holding the model and optimizer, which are then not in the dict."""
        return {
            "config": self.cfg.to_dict(), "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "step": self.step, "train_seconds": self.train_seconds, "metrics": self.metrics,
            "phase_seconds": self.phase_seconds, "phase_samples": self.phase_samples,
            "epoch_sums": epoch_sums or {k: [v] for k, v in self.sums.plain().items()},
            "controller": None if self.controller is None else self.controller.state_dict(),
            "tracker": None if self.tracker is None else self.tracker.state_dict(),
            "model": None if sharded else self.model.state_dict(),
            "optimizer": None if sharded else self.optimizer.state_dict(), "sharded": sharded,
            "rng": torch.get_rng_state(),
        }

    def save_checkpoint(self) -> str:
        """Rank 0 writes ``out/checkpoint.pt`` atomically; the other processes wait for it. ``parallel: fsdp``:
        every process first writes its shards to a new folder ``out/sharded-<step>-<n>``, which the checkpoint
        names; the older folders are deleted once it is written."""
        path = os.path.join(self.out, CHECKPOINT)
        sums = self.sums.gathered()                 # every process's partial sums
        folder = None
        if self.cfg.parallel == "fsdp":
            from ..sharded_checkpoint import save_sharded
            folder = distributed.broadcast_object(_free_name(self.out, f"sharded-{self.step}") if self.rank == 0
                                                  else None)
            save_sharded(os.path.join(self.out, folder), self.model, self.optimizer)
        if self.rank == 0:
            files.save_torch(path, self.state_dict(sums, folder))
            for old in os.listdir(self.out) if folder else ():
                if old.startswith("sharded-") and old != folder:
                    shutil.rmtree(os.path.join(self.out, old))
        distributed.barrier()
        return path

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        if self.controller is not None:           # rebuild the factored layers first, then load their values
            self.controller.load_state_dict(state["controller"])
        if state.get("sharded"):
            from ..sharded_checkpoint import load_sharded
            load_sharded(os.path.join(self.out, state["sharded"]), self.model, self.optimizer)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.train_seconds, self.metrics = state["train_seconds"], state["metrics"]
        self.phase_seconds = state.get("phase_seconds", self.phase_seconds)
        self.phase_samples = state.get("phase_samples", self.phase_samples)
        self.sums = RunningSums.restored(state.get("epoch_sums", {}), self.device, self.rank, self.world_size)

    # ------------------------------------------------------------------ training
    def train(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the results dict (also written to ``out/results.json``). The claim
        on ``out`` is released when this returns or raises."""
        try:
            return self._train()
        finally:
            if self.folder is not None:
                self.folder.release()

    def _train(self) -> dict[str, Any]:
        text = tasks.is_text(self.data)
        self.files = RunFiles(self.out, x_key="step" if text else "epoch", first=self.step if text else self.epoch)
        with stop_signals_to(self._request_stop):
            while self.epoch < self.cfg.epochs:
                self._train_epoch()
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.epoch == self.cfg.epochs:
                    self._end_at_cut_ranks()
                self._record()
        return self.results()

    def _end_at_cut_ranks(self) -> None:
        """With ``augment_bases`` the layers hold up to twice their cut ranks between basis updates: the run ends
        with one more cut and no widening, so that the final model, its evaluation and the saved files keep only
        what the rank rule (or ``stored_budget``) allows."""
        ctl = self.controller
        if isinstance(ctl, OIALR) and ctl.config.augment_bases and ctl.phase == "low-rank":
            ctl.update_bases(grow=False)

    def _request_stop(self, signum, frame) -> None:
        if self._stop_signal is not None:          # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.log(f"{signal.Signals(signum).name} received: saving a checkpoint after this step "
                 "(press Ctrl-C again to abort without saving)")

    def _train_epoch(self) -> None:
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        if self.batch_in_epoch == 0:
            self.sums = RunningSums(self.device)
        start = time.perf_counter()
        batches = progress(self.train_loader, f"epoch {self.epoch + 1}/{self.cfg.epochs}", self.rank == 0)
        for i, (x, y) in enumerate(batches):
            if i < self.batch_in_epoch:            # resumed mid-epoch: these batches were already trained
                continue
            self._train_step(x, y)
            self.batch_in_epoch = i + 1
            every = self.cfg.eval_every
            if every is not None and self.step % every == 0 and self.batch_in_epoch < len(self.train_loader):
                self.train_seconds += time.perf_counter() - start
                self._record()                     # mid-epoch; the epoch's last batch is recorded after the loop
                start = time.perf_counter()
            if self.world_size > 1 and self.step % STOP_POLL_EVERY:
                continue
            signum = int(distributed.all_reduce([self._stop_signal or 0], op="max")[0])   # one stop step for all
            if signum:
                self.train_seconds += time.perf_counter() - start
                raise Interrupted(signum, self.step, self.save_checkpoint())
        self.train_seconds += time.perf_counter() - start

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on ``x``, ``y``: classes ``(B,)`` for ``(B, K)`` logits, or next bytes ``(B, T)``
        for ``(B, T, V)`` logits (the loss is the mean over all ``B·T`` predictions)."""
        start = time.perf_counter()
        phase = self.controller.phase if self.controller is not None else "full-rank"
        lr = learning_rate(self.cfg, self.step, self.total_steps, self.lr_warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        x, y = x.to(self.device), y.to(self.device)
        logits = self.net(x)
        loss = self.loss_fn(logits.flatten(0, -2), y.flatten())
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.sums.add(loss, logits, y)                  # summed on the device: no sync per step
        del loss, logits                    # the graph holds FSDP2's units: freed before the controller replaces any
        if self.tracker is not None:                # first: an automatic transition reads its sample of this step
            self.tracker.step()
        if self.controller is not None:
            self.controller.step()
        self.step += 1
        self.phase_seconds[phase] += time.perf_counter() - start      # no device sync: exact on the CPU only
        self.phase_samples[phase] += y.numel() * self.world_size

    def _record(self) -> None:
        """Evaluate, append a metrics row (the training loss since the last row), write the files, checkpoint.
        ``epoch`` is the number of completed epochs, or a fraction within one (``eval_every``)."""
        eval_loss, top1 = evaluate(self.model, self.test_loader, self.device, same_forwards=self.sharded)
        loss, correct, seen = self.sums.totals()
        self.sums = RunningSums(self.device)
        seen = max(seen, 1)
        epoch = self.epoch if self.batch_in_epoch == 0 else round(
            self.epoch + self.batch_in_epoch / len(self.train_loader), 4)
        if not math.isfinite(loss / seen):        # every process sees the same sums: all stop here
            raise Diverged(loss / seen, epoch, self.step)
        row = {"epoch": epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": loss / seen, "train_top1": correct / seen,
               **tasks.eval_row(self.data, eval_loss, top1), "train_seconds": self.train_seconds,
               **(tasks.throughput(self.phase_seconds, self.phase_samples) if tasks.is_text(self.data) else {}),
               **param_stats(self.model, self.controller and self.controller.summary(), self.dense_params)}
        self.metrics.append(row)
        if self.rank == 0:
            self.files.end_of_epoch(self.metrics, self.tracker)
        self.save_checkpoint()
        where = f"epoch {epoch:3d}/{self.cfg.epochs}" if isinstance(epoch, int) else f"epoch {epoch:.2f}"
        score = f"val bpb {row['val_bpb']:.4f}" if "val_bpb" in row else f"test top1 {top1:.4f}"
        self.log(f"{where}  loss {row['train_loss']:.4f}  {score}  trainable {row['trainable_fraction']:.1%}  "
                 f"phase {row['phase']}  {self.train_seconds:.0f}s")

    # ------------------------------------------------------------------ results
    def results(self) -> dict[str, Any]:
        """The results dict (:func:`oialr.cli.results.run_results`); rank 0 writes it and the final files."""
        model = self._gathered_model() if self.sharded else self.model     # sharded: on rank 0 only
        compact = None if model is None else compact_lowrank(copy.deepcopy(model)).eval()
        compact_params = distributed.broadcast_object(compact and sum(p.numel() for p in compact.parameters()))
        results = run_results(self, compact_params)
        if self.rank == 0:
            self.files.final(results, self.metrics, model, compact, self.tracker, self.log,
                             self.controller.config if isinstance(self.controller, OIALR) else None)
        distributed.barrier()
        return results

    def _gathered_model(self) -> nn.Module | None:
        """On rank 0, a plain copy of the sharded model (same structure, full values: gathered one tensor at a
        time to rank 0); None on the other processes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        plain = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes, **self.cfg.model_args)
        structure.apply(plain, structure.plan(plain, structure.describe(self.model)))
        plain.load_state_dict(state)
        return plain.train(self.model.training)


def _sharded(model: nn.Module, cfg: TrainConfig):
    """Shard ``model`` in the FSDP2 layout OIALR needs (also for ``full-rank``, so that both compare alike); the
    function that builds a unit. Imported here: other runs never load FSDP."""
    from torch.distributed.fsdp import fully_shard
    from ..sharding import shard_targets
    shard_targets(model, cfg.oialr, fully_shard)
    return fully_shard


def _free_name(folder: str, stem: str) -> str:
    """``stem-0``, or the first ``stem-<n>`` not yet in ``folder``."""
    n = 0
    while os.path.exists(os.path.join(folder, f"{stem}-{n}")):
        n += 1
    return f"{stem}-{n}"


def _compiled(wrap):
    """``wrap`` (or nothing) followed by ``torch.compile``."""
    return lambda model: torch.compile(model if wrap is None else wrap(model))
