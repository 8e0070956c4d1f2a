"""OIALR under torch.distributed: 2 CPU processes (gloo) hold identical factors, match 1 process, resume exactly;
the CLI under torchrun. Spawned workers write what they saw to files that the tests compare."""
import datetime
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models import batches, mlp
from oialr import OIALR, LowRankLayer, OIALRConfig, distributed
from oialr.cli.interrupts import Interrupted
from oialr.cli.start import start_or_resume
from oialr.cli.settings import ConfigError, build_config
from oialr.layers.base import rebuild

STEPS, SAVE_AT = 14, 8           # the MLP below changes ranks before step 8 (asserted)
PERTURB_TRANSITION, PERTURB_UPDATE = 3, 7      # steps where rank 1 perturbs its weights just before ctl.step()


# ---------------------------------------------------------------------------------------- fingerprints of values
def fingerprint(tensors) -> int:
    """An integer that changes when a shape or a single bit of ``tensors`` changes: ``h ← 31·h + Σ_i b_i·(i mod
    65521 + 1) + |shape|`` over the bytes ``b_i`` of each tensor, modulo the prime ``2⁶¹ − 1``."""
    h = 0
    for t in tensors:
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).to(torch.int64)
        weights = torch.arange(data.numel(), dtype=torch.int64) % 65521 + 1
        shape = sum((d + 1) * 1000003 ** j for j, d in enumerate(t.shape))
        h = (31 * h + int((data * weights).sum()) + shape) % (2 ** 61 - 1)
    return h


def factor_fingerprint(model) -> int:
    """:func:`fingerprint` of every factored layer's ``U``, ``Σ``, ``V`` (shapes, hence ranks, included)."""
    return fingerprint(t for m in model.modules() if isinstance(m, LowRankLayer)
                       for t in (m.lowrank_U, m.lowrank_S, m.lowrank_V))


def all_equal(value: int) -> bool:
    """True when every process passed the same integer (e.g. a :func:`fingerprint`)."""
    if not distributed.is_distributed():
        return True
    t = torch.tensor([-value, value], dtype=torch.int64)
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return -t[0].item() == t[1].item()

def _spawn(fn, *args):
    """Run ``fn(rank, 2, *args)`` in 2 processes forked from a server that imported torch and ``fn``'s module once
    (4 fresh interpreters would spend most of these tests importing torch)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "oialr.cli.start", fn.__module__])
    mp.start_processes(fn, args=(2, *args), nprocs=2, start_method="forkserver")


def _config():
    return OIALRConfig(warmup_steps=3, update_every=2, cutoff=0.3)


def _init(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _train(world, rank, out, start_from=None, compiled=False):
    """The test_controller MLP on global batches of 16 (``16 / world`` rows per process, DDP averaging), from
    scratch or from the checkpoint ``start_from``, optionally through ``torch.compile(DDP(model))``; rank 1
    perturbs its weights just before a transition and an update. Returns the final model and, per step, the ranks
    and whether the factors agree over processes."""
    torch.manual_seed(1)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    wraps = []

    def wrap(m):
        wraps.append(1)
        return torch.compile(distributed.ddp(m), backend="aot_eager") if compiled else distributed.ddp(m)

    ctl = OIALR(model, opt, _config(), wrap=wrap if world > 1 else None)
    start, log = 0, {"ranks": [], "agree": [], "agree_before": {}, "losses": []}
    if start_from is not None:
        state = torch.load(start_from, weights_only=True)
        ctl.load_state_dict(state["ctl"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = ctl.step_count
    for step, (x, y) in enumerate(batches((16, 16), 4, STEPS, seed=3)[start:], start=start + 1):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ctl.wrapped_model(x[rank::world]), y[rank::world])
        loss.backward()
        opt.step()
        if world > 1 and step in (PERTURB_TRANSITION, PERTURB_UPDATE) and start_from is None:
            doomed = [layer.lowrank_S for layer in ctl.lowrank_layers().values()] or \
                [model.get_submodule(info.name).weight for info in ctl.layer_infos if info.convert]
            with torch.no_grad():                   # weights the transition / update is about to replace
                for p in doomed:
                    p.add_(1e-3 * torch.randn_like(p) * (rank == 1))
            log["agree_before"][step] = all_equal(fingerprint(doomed))
        ctl.step()
        log["ranks"].append({n: layer.rank for n, layer in ctl.lowrank_layers().items()})
        log["agree"].append(all_equal(factor_fingerprint(model)))
        log["losses"].append(distributed.all_reduce([loss.item() / world])[0])
        if step == SAVE_AT and start_from is None and out is not None:
            if rank == 0:
                torch.save({"ctl": ctl.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()},
                           os.path.join(out, "checkpoint.pt"))
            distributed.barrier()
    log["wraps"] = len(wraps)
    return model, log


def _auto_transition_step(rank):
    """warmup_steps="auto" where rank 1's plateau rule never fires: rank 0's decision switches both processes."""
    torch.manual_seed(1)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps="auto", auto={"every": 1, "min_steps": 1, "max_steps": 3}))
    if rank == 1:
        ctl.rule.update = lambda step, stability: False
    for x, y in batches((16, 16), 4, 4, seed=3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ctl.step()
    return ctl.transition_step


def _worker(rank, world, init_file, out, resume):
    _init(rank, world, init_file)
    model, log = _train(world, rank, out, os.path.join(out, "checkpoint.pt") if resume else None)
    log["auto_transition_step"] = None if resume else _auto_transition_step(rank)
    gathered = [None] * world
    dist.all_gather_object(gathered, factor_fingerprint(model))
    log["fingerprints"] = gathered
    name = "resumed" if resume else "run"
    torch.save({"model": model.state_dict(), "log": log}, os.path.join(out, f"{name}{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """One 2-process run (checkpoint at SAVE_AT), then 2 fresh processes resuming from that checkpoint."""
    out = str(tmp_path_factory.mktemp("ddp"))
    for resume in (False, True):
        _spawn(_worker, os.path.join(out, f"init{resume}"), out, resume)
    return {name: [torch.load(os.path.join(out, f"{name}{r}.pt"), weights_only=True) for r in (0, 1)]
            for name in ("run", "resumed")}


def test_factors_and_ranks_identical_on_both_processes(two_process_runs):
    run = two_process_runs["run"]
    log0, log1 = run[0]["log"], run[1]["log"]
    assert log0["ranks"] == log1["ranks"]
    assert log0["ranks"][SAVE_AT - 1] != log0["ranks"][2], "the test needs a rank change"
    assert all(log0["agree"]) and all(log1["agree"])
    assert log0["fingerprints"][0] == log0["fingerprints"][1]
    for (name, p0), p1 in zip(run[0]["model"].items(), run[1]["model"].values()):
        assert torch.equal(p0, p1), name


def test_broadcast_overrides_a_perturbed_process(two_process_runs):
    log = two_process_runs["run"][0]["log"]
    # rank 1 perturbed its weights just before the transition and an update: they differed, then agreed
    assert log["agree_before"] == {PERTURB_TRANSITION: False, PERTURB_UPDATE: False}
    assert log["agree"][PERTURB_TRANSITION - 1] and log["agree"][PERTURB_UPDATE - 1]


def test_automatic_transition_is_decided_by_rank_0(two_process_runs):
    assert [two_process_runs["run"][r]["log"]["auto_transition_step"] for r in (0, 1)] == [3, 3]


def test_wrapper_rebuilt_only_when_shapes_change(two_process_runs):
    log = two_process_runs["run"][0]["log"]
    lowrank = log["ranks"][PERTURB_TRANSITION - 1:]
    rank_changes = sum(a != b for a, b in zip(lowrank, lowrank[1:]))
    assert log["wraps"] == 2 + rank_changes        # first use, the transition, each step that changed a rank


def _effective(state):
    """Each factored layer's ``W = U Σ Vᵀ`` and every other parameter: what the model computes. (``U`` and ``V``
    alone may differ more: singular vectors of close singular values are ill-conditioned.)"""
    out = {k: v for k, v in state.items() if "lowrank_" not in k}
    for name in {k.rpartition(".lowrank_")[0] for k in state if "lowrank_" in k}:
        out[name] = rebuild(*(state[f"{name}.lowrank_{f}"] for f in "USV"))
    return out


def test_two_processes_match_one_process(two_process_runs):
    """Same global batches (the shards' union), DDP averaging = the global mean: equal up to summation order.
    Measured: losses within 2e-7 relative, weights within 4e-6 after 14 steps with 5 basis updates."""
    model, log = _train(1, 0, None)                     # this process, no process group
    ddp_log = two_process_runs["run"][0]["log"]
    assert log["ranks"] == ddp_log["ranks"]
    assert log["losses"] == pytest.approx(ddp_log["losses"], rel=1e-6)
    one, two = _effective(model.state_dict()), _effective(two_process_runs["run"][0]["model"])
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=2e-5, msg=name)


def test_resume_in_fresh_processes_is_exact(two_process_runs):
    run, resumed = two_process_runs["run"], two_process_runs["resumed"]
    assert resumed[0]["log"]["ranks"] == run[0]["log"]["ranks"][SAVE_AT:]
    assert all(resumed[0]["log"]["agree"])
    for r in (0, 1):
        for (name, p), q in zip(run[r]["model"].items(), resumed[r]["model"].values()):
            assert torch.equal(p, q), (r, name)


def _compiled_worker(rank, world, init_file, out):
    _init(rank, world, init_file)
    torch._dynamo.reset()
    _, log = _train(world, rank, None, compiled=True)
    log["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch.save(log, os.path.join(out, f"compiled{rank}.pt"))
    dist.destroy_process_group()


def test_compiled_ddp_trains_as_one_eager_process(tmp_path):
    """``torch.compile`` over DDP (recompiled at the transition; rank changes reuse the graph) in 2 processes follows
    the same losses and ranks as one eager process, the factors identical on both processes at every step."""
    _spawn(_compiled_worker, str(tmp_path / "init"), str(tmp_path))
    logs = [torch.load(tmp_path / f"compiled{r}.pt", weights_only=True) for r in (0, 1)]
    _, eager = _train(1, 0, None)
    assert logs[0]["ranks"] == logs[1]["ranks"] == eager["ranks"]
    assert all(logs[0]["agree"]) and all(logs[1]["agree"])
    assert logs[0]["wraps"] >= 3                                # the wrapper is rebuilt after each shape change,
    assert logs[0]["graphs"] == 2                               # but dense and factored are the only graphs
    assert logs[0]["losses"] == pytest.approx(eager["losses"], rel=1e-5)


# ---------------------------------------------------------------------------------------- the training recipe
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An MNIST-1D cache folder, filled here once so that processes do not generate it concurrently."""
    from oialr.cli.data import load_dataset
    path = str(tmp_path_factory.mktemp("mnist1d"))
    load_dataset("mnist1d", path)
    return path


def tiny(data_dir, **extra):
    return build_config({"dataset": "mnist1d", "data_dir": data_dir, "model": "mlp", "model_args": {"width": 32},
                         "epochs": 3, "batch_size": 256, "threads": 1,
                         "oialr": {"warmup_steps": 20, "update_every": 7, "cutoff": 0.2}, **extra})


def _recipe_worker(rank, world, init_file, data_dir, out, parallel):
    """An uninterrupted run; a run that only rank 1 asks to stop after step 26 (all stop at the next poll of the
    flag, step 30, the last batch of epoch 2); its resumption. Parameters as this process holds them (its shards
    under FSDP)."""
    _init(rank, world, init_file)
    quiet = lambda *args, **kwargs: None
    straight = start_or_resume(tiny(data_dir, parallel=parallel), os.path.join(out, "straight"), False, log=quiet)
    expected = straight.train()
    run = start_or_resume(tiny(data_dir, parallel=parallel), os.path.join(out, "stopped"), False, log=quiet)
    real_step = run._train_step

    def step(x, y):
        real_step(x, y)
        if rank == 1 and run.step == 26:                # a signal that reached one process only
            run._stop_signal = signal.SIGTERM

    run._train_step = step
    with pytest.raises(Interrupted) as stopped:
        run.train()
    resumed = start_or_resume(None, os.path.join(out, "stopped"), True, log=quiet)
    at = (resumed.step, resumed.batch_in_epoch)
    got = resumed.train()
    own = lambda model: {k: getattr(v, "to_local", v.detach)() for k, v in model.state_dict().items()}  # noqa: E731
    torch.save({"expected": expected, "got": got, "stopped": str(stopped.value), "at": at,
                "straight": own(straight.model), "resumed": own(resumed.model)},
               os.path.join(out, f"recipe{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_recipe_stops_all_processes_at_one_step_and_resumes_exactly(data_dir, tmp_path, parallel):
    _spawn(_recipe_worker, str(tmp_path / "init"), data_dir, str(tmp_path), parallel)
    seen = [torch.load(tmp_path / f"recipe{r}.pt", weights_only=False) for r in (0, 1)]
    for r in (0, 1):
        assert "SIGTERM at step 30" in seen[r]["stopped"] and seen[r]["at"] == (30, 15)
        got, expected = seen[r]["got"], seen[r]["expected"]
        assert got["world_size"] == 2 and got["steps"] == expected["steps"] == 3 * 15
        assert got["top1"] == expected["top1"] and got["layers"] == expected["layers"]
        for (name, p), q in zip(seen[r]["straight"].items(), seen[r]["resumed"].values()):
            assert torch.equal(p, q), (r, name)
    assert json.load(open(tmp_path / "stopped" / "results.json"))["top1"] == seen[0]["got"]["top1"]
    sharded = [p.name for p in (tmp_path / "stopped").iterdir() if p.name.startswith("sharded-")]
    assert sharded == (["sharded-45-0"] if parallel == "fsdp" else [])      # the last checkpoint's shards only


def test_global_batch_must_divide_over_the_processes(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ConfigError, match="batch_size 256 is the global batch and must be divisible by the 3 "
                                          "processes; choose a multiple of 3, e.g. 255"):
        start_or_resume(tiny(data_dir), str(tmp_path / "r"), False)


def test_cli_under_torchrun(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "oialr",
           "train", "--dataset", "mnist1d", "--data-dir", data_dir, "--model", "mlp", "--epochs", "2",
           "--set", "oialr.warmup_steps=0.5", "--set", "model_args.width=32", "--set", "threads=1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(out / "results.json"))
    assert results["world_size"] == 2 and results["steps"] == 2 * 31
    names = {p.name for p in out.iterdir()}             # written once, by rank 0 (no temporary files left)
    assert names - {"curves.png", "ranks.png", "tensorboard"} == {
        "checkpoint.pt", "compact", "metrics.csv", "metrics.jsonl", "model", "results.json"}
    assert {p.name for p in (out / "model").iterdir()} == {"model.safetensors", "oialr_config.json"}
    assert "tensorboard" not in names or len(list((out / "tensorboard").iterdir())) == 1
    assert proc.stdout.count("epoch   1/2") == 1 and proc.stdout.count("done: top1") == 1, proc.stdout


# ---------------------------------------------------------------------------------------- single-process API
def test_wrapper_is_rebuilt_only_after_new_parameters():
    torch.manual_seed(1)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    built = []
    ctl = OIALR(model, opt, _config(), wrap=lambda m: built.append(nn.Sequential(m)) or built[-1])
    assert len(built) == 0 and ctl.wrapped_model is ctl.wrapped_model and len(built) == 1
    rebuilt = []
    for x, y in batches((16, 16), 4, STEPS, seed=3):
        opt.zero_grad()
        nn.functional.cross_entropy(ctl.wrapped_model(x), y).backward()
        params = [id(p) for p in ctl.wrapped_model.parameters()]
        opt.step()
        ctl.step()
        rebuilt.append(params != [id(p) for p in model.parameters()])
    assert len(built) == 1 + sum(rebuilt[:-1]) and rebuilt[PERTURB_TRANSITION - 1]
    assert all(p is q for p, q in zip(ctl.wrapped_model.parameters(), model.parameters()))


def test_wrapped_model_and_bad_wrap_are_refused(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="wrap must be a callable"):
        OIALR(model, opt, wrap="ddp")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match=r"DistributedDataParallel wrapper.*pass the bare module.*wrap=lambda"):
            OIALR(nn.parallel.DistributedDataParallel(model), opt)
        assert not distributed.is_distributed()         # one process: nothing is broadcast
    finally:
        dist.destroy_process_group()


def test_fingerprint_sees_one_bit_and_shapes():
    t = torch.randn(5, 7)
    flipped = t.clone()
    flipped.view(torch.int32)[3, 4] ^= 1
    assert fingerprint([t]) == fingerprint([t.clone()])
    assert fingerprint([t]) != fingerprint([flipped])
    assert fingerprint([t]) != fingerprint([t.reshape(7, 5)])
    assert all_equal(123) and distributed.broadcast_ints([4, 2]) == [4, 2]
