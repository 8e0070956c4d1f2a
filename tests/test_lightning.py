"""OIALRCallback in Lightning: optimizer steps under accumulate_grad_batches, exact resume from fit(ckpt_path=...)."""
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

import oialr  # noqa: E402
from oialr.integrations.lightning import OIALRCallback, _check_ddp  # noqa: E402

CONFIG = dict(warmup_steps=3, update_every=2, cutoff=0.3)     # transition after step 3, basis updates at 5, 7, ...


class Classifier(L.LightningModule):
    """A small MLP; records the loss of every micro-batch and the controller's phase at every optimizer step."""

    def __init__(self, lr=3e-2):
        super().__init__()
        torch.manual_seed(0)
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + 0.1 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def loader():
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(96, 16, generator=g), torch.randint(0, 4, (96,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)          # 12 micro-batches = 6 optimizer steps per epoch


class RankLog(L.pytorch.callbacks.Callback):
    """The ranks of the factored layers after every optimizer step (listed after the OIALRCallback it reads)."""

    def __init__(self, callback):
        self.callback, self.ranks = callback, {}

    def on_train_batch_end(self, trainer, *_):
        self.ranks[trainer.global_step] = {n: m.rank for n, m in self.callback.controller.lowrank_layers().items()}


def fit(tmp_path, epochs, *, ckpt_path=None, callback_first=True, checkpoint=False):
    module, callback = Classifier(), OIALRCallback(oialr.OIALRConfig(**CONFIG))
    callback.rank_log = RankLog(callback)
    extra = [L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1,
                                                 save_on_train_epoch_end=True)] if checkpoint else []
    ours = [callback, callback.rank_log]
    trainer = L.Trainer(max_epochs=epochs, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
                        callbacks=ours + extra if callback_first else extra + ours,
                        enable_checkpointing=checkpoint, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, deterministic=True)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer, module, callback


def test_counts_optimizer_steps_not_micro_batches(tmp_path):
    module, callback = Classifier(), OIALRCallback(oialr.OIALRConfig(**CONFIG))
    phases = []

    class Recorder(L.pytorch.callbacks.Callback):
        def on_fit_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_post_hook(lambda *_: phases.append(callback.controller.phase))
    trainer = L.Trainer(max_steps=6, accumulate_grad_batches=3, accelerator="cpu", devices=1, logger=False,
                        callbacks=[callback, Recorder()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader())
    assert callback.controller.step_count == trainer.global_step == len(phases) == 6
    assert callback.controller.transition_step == 3
    assert phases == ["full-rank"] * 3 + ["low-rank"] * 3


@pytest.mark.parametrize("callback_first", [True, False], ids=["oialr-first", "checkpoint-first"])
def test_resume_after_a_rank_change_continues_exactly(tmp_path, callback_first):
    straight, straight_module, _ = fit(tmp_path / "straight", 2)
    _, _, first = fit(tmp_path / "run", 1, checkpoint=True, callback_first=callback_first)
    ckpt = next((tmp_path / "run").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["OIALRCallback"]
    assert saved["step"] == 6 and saved["transition_step"] == 3
    assert saved["ranks"] == {name: layer.rank for name, layer in first.controller.lowrank_layers().items()}
    assert saved["ranks"] != first.rank_log.ranks[3]          # the basis update at step 5 cut ranks

    resumed, module, callback = fit(tmp_path / "resumed", 2, ckpt_path=ckpt, callback_first=callback_first)
    assert callback.controller.step_count == resumed.global_step == 12
    assert module.losses == straight_module.losses[12:]
    straight_weights, resumed_weights = straight_module.state_dict(), module.state_dict()
    assert straight_weights.keys() == resumed_weights.keys()
    for key, value in straight_weights.items():
        assert torch.equal(resumed_weights[key], value), key


def test_resume_from_a_checkpoint_without_oialr_state_is_refused(tmp_path):
    module = Classifier()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="which holds no OIALRCallback state"):
        fit(tmp_path / "resumed", 2, ckpt_path=tmp_path / "plain.ckpt")


def ddp_worker(out):
    """Under torchrun: fit straight, for one epoch with a checkpoint, and resumed; write what each process saw."""
    torch.set_num_threads(1)
    runs = {}
    # 3 optimizer steps per epoch and process: the checkpoint at step 6 comes after the rank cut at step 5
    for name, epochs, ckpt in [("straight", 3, None), ("first", 2, None), ("resumed", 3, f"{out}/first/last.ckpt")]:
        module, callback = Classifier(lr=1e-1), OIALRCallback(oialr.OIALRConfig(**CONFIG))
        rank_log = RankLog(callback)
        trainer = L.Trainer(max_epochs=epochs, accumulate_grad_batches=2, accelerator="cpu", devices=2,
                            strategy="ddp_find_unused_parameters_true", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=f"{out}/{name}", deterministic=True,
                            callbacks=[callback, rank_log,
                                       L.pytorch.callbacks.ModelCheckpoint(dirpath=f"{out}/{name}", save_last=True)])
        trainer.fit(module, loader(), ckpt_path=ckpt)
        runs[name] = {"losses": module.losses, "ranks": callback.controller.summary()["layers"], "log": rank_log.ranks,
                      "weights": [p.detach().double().sum().item() for p in module.parameters()]}
    (pathlib.Path(out) / f"process{trainer.global_rank}.json").write_text(json.dumps(runs))


def test_two_processes_stay_identical_and_resume_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(oialr.__file__).parents[1]),
                                                         os.path.dirname(__file__)])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
                    str(tmp_path)], check=True, env=env, capture_output=True, timeout=300)
    first, second = (json.loads((tmp_path / f"process{r}.json").read_text()) for r in (0, 1))
    assert first["first"]["log"]["6"] != first["first"]["log"]["3"]         # the checkpoint follows a rank cut
    # Σ's gradients were averaged: the same weights on both processes ("first" ends between two basis updates,
    # each of which broadcasts process 0's Σ, so it is the run that would show a difference)
    for run in ("straight", "first", "resumed"):
        assert first[run]["weights"] == second[run]["weights"]
    for process in (first, second):
        straight, resumed = process["straight"], process["resumed"]
        assert resumed["losses"] == straight["losses"][len(process["first"]["losses"]):]
        assert resumed["weights"] == straight["weights"] and resumed["ranks"] == straight["ranks"]


def test_multi_process_training_needs_ddp_with_find_unused_parameters():
    with pytest.raises(ValueError, match="supports multi-process training with DistributedDataParallel only"):
        _check_ddp(nn.Linear(2, 2))
    wrapper = object.__new__(nn.parallel.DistributedDataParallel)
    object.__setattr__(wrapper, "find_unused_parameters", False)
    object.__setattr__(wrapper, "static_graph", False)
    with pytest.raises(ValueError, match="needs DDP with find_unused_parameters=True"):
        _check_ddp(wrapper)


def test_a_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch.callbacks", None)          # as if it were not installed
    monkeypatch.delitem(sys.modules, "oialr.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install oialr\[lightning\]"):
        importlib.import_module("oialr.integrations.lightning")


if __name__ == "__main__":
    ddp_worker(sys.argv[1])


def test_a_config_that_is_not_an_oialr_config_is_refused():
    with pytest.raises(TypeError, match=r"config must be an oialr.OIALRConfig \(or None for the defaults\), got dict"):
        OIALRCallback({"cutoff": 0.1})
    assert OIALRCallback().config == oialr.OIALRConfig()
