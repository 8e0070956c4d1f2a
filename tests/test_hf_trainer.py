"""OIALRCallback in the Hugging Face Trainer: optimizer steps, Σ's Adam state, exact resume after a rank change."""
import importlib
import json
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import oialr  # noqa: E402
from oialr.integrations.transformers import STATE_FILE, OIALRCallback  # noqa: E402

CONFIG = dict(warmup_steps=3, update_every=2, cutoff=0.3)     # transition after step 3, rank cuts at steps 5, 7, 9


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def token_data(n=64):
    ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x} for x in ids]


class RankLog(transformers.TrainerCallback):
    """The ranks of the factored layers after every optimizer step (listed after the OIALRCallback it reads)."""

    def __init__(self, callback):
        self.callback, self.ranks = callback, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.ranks[state.global_step] = {n: m.rank for n, m in self.callback.controller.lowrank_layers().items()}


class StopAfter(transformers.TrainerCallback):
    """Interrupts training after ``step`` optimizer steps (the schedule still spans ``max_steps``)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step


def trainer(out, max_steps=10, save_steps=None, optim="adamw_torch", optimizer=None, accumulate=2, stop_after=None):
    model = tiny_llama()
    callback = OIALRCallback(oialr.OIALRConfig(**CONFIG))
    callback.rank_log = RankLog(callback)
    callbacks = [callback, callback.rank_log] + ([StopAfter(stop_after)] if stop_after else [])
    args = transformers.TrainingArguments(
        str(out), max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=accumulate,
        learning_rate=1e-2, logging_steps=1, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 1,
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, optim=optim)
    optimizers = (None, None) if optimizer is None else (optimizer(model), None)
    return transformers.Trainer(model=model, args=args, train_dataset=token_data(), callbacks=callbacks,
                                optimizers=optimizers), callback


def losses(t):
    return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}


def test_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    t, callback = trainer(tmp_path, max_steps=6, accumulate=3)
    phases = []                                     # the controller's phase as each optimizer step runs
    t.create_optimizer()
    inner = t.optimizer
    inner.register_step_post_hook(lambda *_: phases.append(callback.controller.phase))
    t.train()
    ctl = callback.controller
    assert ctl.step_count == t.state.global_step == len(phases) == 6
    assert ctl.transition_step == 3
    assert phases == ["full-rank"] * 3 + ["low-rank"] * 3


def test_scheduler_drives_sigma_and_adam_state_survives_basis_updates(tmp_path):
    t, callback = trainer(tmp_path)
    t.create_optimizer()
    sigma_lrs = []                                  # per optimizer step: the lr of the groups holding a Σ

    def record(optimizer, *_):
        sigmas = [layer.lowrank_S for layer in callback.controller.lowrank_layers().values()]
        sigma_lrs.append({g["lr"] for g in optimizer.param_groups if any(p is s for p in g["params"] for s in sigmas)})
    t.optimizer.register_step_post_hook(record)
    t.train()
    ctl = callback.controller
    inner = t.optimizer.optimizer                   # accelerate's wrapper around the torch AdamW
    assert ctl.optimizer is inner and isinstance(inner, torch.optim.AdamW)
    # linear decay from 1e-2 over 10 steps: step k runs at 1e-2·(11-k)/10; Σ exists from step 4 on
    assert sigma_lrs[:3] == [set()] * 3
    assert [lr.pop() for lr in sigma_lrs[3:]] == pytest.approx([1e-2 * (11 - k) / 10 for k in range(4, 11)])
    for layer in ctl.lowrank_layers().values():
        # 7 steps since the transition: the state was carried through the basis updates at steps 5, 7, 9
        assert float(inner.state[layer.lowrank_S]["step"]) == 7
    assert any(layer.rank < min(layer.matrix_shape) for layer in ctl.lowrank_layers().values())


def foreach_adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)


def train_straight_and_resume(tmp_path, stop, optim="adamw_torch", optimizer=None):
    """Train 10 steps straight; train again, interrupted after ``stop`` steps with a checkpoint there, and resume
    it in a fresh model and Trainer. Returns the straight and resumed Trainers and the interrupted run's callback."""
    straight, _ = trainer(tmp_path / "straight", optim=optim, optimizer=optimizer)
    straight.train()
    first, interrupted = trainer(tmp_path / "run", save_steps=stop, optim=optim, optimizer=optimizer, stop_after=stop)
    first.train()
    resumed, callback = trainer(tmp_path / "run", optim=optim, optimizer=optimizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{stop}"))
    assert callback.controller.step_count == 10
    expected, got = losses(straight), losses(resumed)
    assert [got[step] for step in range(stop + 1, 11)] == [expected[step] for step in range(stop + 1, 11)]
    straight_weights, resumed_weights = straight.model.state_dict(), resumed.model.state_dict()
    assert straight_weights.keys() == resumed_weights.keys()
    for key, value in straight_weights.items():
        assert torch.equal(resumed_weights[key], value), key
    return interrupted


@pytest.mark.parametrize("optim, optimizer", [("adamw_torch", None), ("adamw_torch_fused", None),
                                              ("adamw_torch", foreach_adamw)], ids=["adamw", "fused", "foreach"])
def test_resume_after_a_rank_change_continues_exactly(tmp_path, optim, optimizer):
    interrupted = train_straight_and_resume(tmp_path, 6, optim, optimizer)
    saved = torch.load(tmp_path / "run" / "checkpoint-6" / STATE_FILE, weights_only=True)
    assert saved["step"] == 6 and saved["transition_step"] == 3
    ranks = interrupted.rank_log.ranks
    assert saved["ranks"] == ranks[6] != ranks[3]            # the basis update at step 5 cut ranks


def test_resume_before_the_transition_continues_exactly(tmp_path):
    train_straight_and_resume(tmp_path, 2)
    saved = torch.load(tmp_path / "run" / "checkpoint-2" / STATE_FILE, weights_only=True)
    assert saved["step"] == 2 and saved["transition_step"] is None


def test_resume_without_what_it_needs_is_refused(tmp_path):
    first, _ = trainer(tmp_path / "run", save_steps=6, stop_after=6)
    first.train()
    checkpoint = str(tmp_path / "run" / "checkpoint-6")
    late, callback = trainer(tmp_path / "run")
    late.remove_callback(callback)
    late.add_callback(OIALRCallback(oialr.OIALRConfig(**CONFIG)))     # too late to catch the factored weights
    with pytest.raises(ValueError, match=r"to resume, pass OIALRCallback to Trainer\(callbacks=\[...\]\) rather"):
        late.train(resume_from_checkpoint=checkpoint)
    (tmp_path / "run" / "checkpoint-6" / STATE_FILE).unlink()
    resumed, _ = trainer(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="resuming at step 6, OIALRCallback found no"):
        resumed.train(resume_from_checkpoint=checkpoint)


def test_bad_config_is_refused():
    with pytest.raises(TypeError, match=r"config must be an oialr.OIALRConfig \(or None for the defaults\), got dict"):
        OIALRCallback({"warmup_steps": 3})


def ddp_worker(out):
    """Under torchrun: train straight, interrupted at step 6 and resumed; write what each process ended with."""
    torch.set_num_threads(1)
    runs = {}
    for name, stop, resume in [("straight", None, False), ("run", 6, False), ("run", None, True)]:
        t, callback = trainer(f"{out}/{name}", save_steps=stop, stop_after=stop)
        t.train(resume_from_checkpoint=f"{out}/run/checkpoint-6" if resume else None)
        runs["resumed" if resume else name] = {
            "losses": losses(t), "ranks": callback.controller.summary()["layers"],
            "weights": [p.detach().double().sum().item() for p in t.model.parameters()]}
    rank = torch.distributed.get_rank()
    (pathlib.Path(out) / f"process{rank}.json").write_text(json.dumps(runs))


def test_two_processes_stay_identical_and_resume_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(oialr.__file__).parents[1]),
                                                         os.path.dirname(__file__)])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
                    str(tmp_path)], check=True, env=env, capture_output=True, timeout=300)
    first, second = (json.loads((tmp_path / f"process{r}.json").read_text()) for r in (0, 1))
    assert first == second                  # Σ's gradients were averaged: the same weights on both processes
    straight, resumed = first["straight"], first["resumed"]
    assert [resumed["losses"][str(s)] for s in range(7, 11)] == [straight["losses"][str(s)] for s in range(7, 11)]
    assert resumed["weights"] == straight["weights"] and resumed["ranks"] == straight["ranks"]


def test_ddp_without_find_unused_parameters_and_loading_the_best_model_are_refused():
    args = SimpleNamespace(world_size=2, ddp_find_unused_parameters=False, ddp_static_graph=None,
                           load_best_model_at_end=False)
    with pytest.raises(ValueError, match=r"OIALRCallback on 2 processes needs ddp_find_unused_parameters=True"):
        OIALRCallback().on_init_end(args, None, None, model=tiny_llama())
    args = SimpleNamespace(world_size=1, ddp_find_unused_parameters=None, ddp_static_graph=None,
                           load_best_model_at_end=True)
    with pytest.raises(ValueError, match="does not support load_best_model_at_end=True"):
        OIALRCallback().on_init_end(args, None, None, model=tiny_llama())


def test_a_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)          # as if it were not installed
    monkeypatch.delitem(sys.modules, "oialr.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install oialr\[hf\]"):
        importlib.import_module("oialr.integrations.transformers")


if __name__ == "__main__":
    ddp_worker(sys.argv[1])


def test_importing_the_integration_registers_gpt2_conv1d():
    code = ("import oialr\n"
            "assert 'hf_conv1d' not in oialr.registered_layer_types()\n"
            "import oialr.integrations.transformers\n"
            "assert 'hf_conv1d' in oialr.registered_layer_types()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
