"""OIALR on a model sharded by FSDP2 (``fully_shard``), 2 CPU processes (gloo): training follows one process through
the transition and rank changes, each shard holds the rows of the single-process tensors, a sharded checkpoint
resumes bit for bit (and loads into another number of processes), tied weights and a kept-dense layer stay in the
root unit, and the CLI's ``parallel: fsdp`` reaches the low-rank phase as one process does."""
import json
import signal
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models import batches
from oialr import OIALR, OIALRConfig, distributed
from oialr.sharded_checkpoint import load_sharded, read_extra, save_sharded
from test_budget import _within_one_step
from test_distributed import _effective, _init, _spawn, data_dir, tiny  # noqa: F401  (data_dir: a fixture)

STEPS, SAVE_AT = 14, 8           # ranks change before step 8 and at later updates (asserted)
CONFIG = dict(warmup_steps=3, update_every=2, cutoff=0.2, exclude_modules=["keep"])


class Net(nn.Module):
    """Two converted layers (33 rows: the shards are uneven), a layer kept dense (``exclude_modules``) and two output
    layers sharing one weight (tied: never converted); the last three live in the root unit."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.keep = nn.Linear(16, 33), nn.Linear(33, 24), nn.Linear(24, 24)
        self.head, self.tied = nn.Linear(24, 4), nn.Linear(24, 4, bias=False)
        self.tied.weight = self.head.weight

    def forward(self, x):
        h = F.relu(self.mid(F.relu(self.inp(x))))
        h = h + torch.tanh(self.keep(h))
        return self.head(h) + 0.5 * self.tied(h)


def _build(world, **options):
    """Net, AdamW and the controller (``CONFIG`` and ``options``); sharded (every converted layer a unit, then the
    root) when ``world > 1``."""
    from oialr.sharding import shard_targets
    torch.manual_seed(1)
    model, config = Net(), OIALRConfig(**CONFIG, **options)
    shard = None
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        shard = fully_shard
        shard_targets(model, config, shard)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    return model, opt, OIALR(model, opt, config, shard=shard)


def _train(rank, world, out=None, resume=False, save_at=SAVE_AT, **options):
    """``STEPS`` global batches of 16 (``16 / world`` rows per process), from scratch (saving a sharded checkpoint
    after ``save_at`` into ``out``) or from that checkpoint. Returns the model, optimizer and a log: per step the
    global loss and the ranks; after the transition whether the root took in the new units."""
    model, opt, ctl = _build(world, **options)
    folder = None if out is None else os.path.join(out, f"step{save_at}-w{world}")
    start = 0
    if resume:
        ctl.load_state_dict(read_extra(folder)["controller"])
        load_sharded(folder, model, opt)
        start = ctl.step_count
    log = {"losses": [], "ranks": [], "kept": []}
    dense = weakref.ref(model.inp) if world > 1 and not resume else None
    units = {}
    for step, (x, y) in enumerate(batches((16, 16), 4, STEPS, seed=3)[start:], start=start + 1):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[rank::world]), y[rank::world])
        loss.backward()
        opt.step()
        log["losses"].append(distributed.all_reduce([loss.item() / world])[0])
        del loss                        # its graph holds the FSDP2 units: drop it before the controller replaces any
        ctl.step()
        log["ranks"].append({name: layer.rank for name, layer in ctl.lowrank_layers().items()})
        log["kept"].append({name: units[name]() is layer for name, layer in ctl.lowrank_layers().items()
                            if name in units})             # the same module (unit) as after the step before
        units = {name: weakref.ref(layer) for name, layer in ctl.lowrank_layers().items()}
        if dense is not None and step == CONFIG["warmup_steps"] + 1:
            log["roots"] = {name: model.get_submodule(name)._get_fsdp_state()._is_root for name in ctl.targets}
            log["units"] = len(model._get_fsdp_state()._state_ctx.all_states)
            log["old_unit_freed"] = dense() is None
        if step == save_at and folder is not None and not resume:
            save_sharded(folder, model, opt, {"controller": ctl.state_dict()})
            log["saved"] = _full(model, opt)
    return model, opt, log


def _signs_aligned(one: dict, two: dict) -> dict:
    """``one`` (single-process tensors by name, parameters and optimizer state) with the sign of every singular pair
    of each factored layer set to ``two``'s: an SVD may return ``(-u_j, -v_j)`` for ``(u_j, v_j)``, and rank 0's SVD
    of inputs that differ in their last bits (summation order) may choose the other. With ``D = diag(±1)`` per
    layer: ``U D``, ``V D``, ``D Σ D``, the first moments alike; the second moments do not change."""
    out = dict(one)
    for layer in {name.rpartition(".lowrank_")[0] for name in one if ".lowrank_" in name}:
        d = torch.sign((one[f"{layer}.lowrank_U"] * two[f"{layer}.lowrank_U"]).sum(0))
        for name, t in one.items():
            if name.startswith(f"{layer}.lowrank_") and t.dim() == 2 and not name.endswith("_sq"):
                out[name] = d[:, None] * t * d if name.startswith(f"{layer}.lowrank_S") else t * d
    return out


def _local(tensors: dict) -> dict:
    return {k: v.to_local() if hasattr(v, "to_local") else v for k, v in tensors.items()}


def _full(model, opt) -> dict:
    """Every parameter and optimizer state entry, whole (gathered when sharded), copied."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
            for k, v in {**model.state_dict(), **_optimizer_state(model, opt)}.items()}


def _optimizer_state(model, opt) -> dict:
    """``name.key -> tensor`` of every optimizer state entry (Adam's moments and step), by parameter name."""
    names = {p: name for name, p in model.named_parameters()}
    return {f"{names[p]}.{k}": v for p, state in opt.state.items() for k, v in state.items()}


def _worker(rank, world, init_file, out, resume):
    _init(rank, world, init_file)
    model, opt, log = _train(rank, world, out, resume)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    torch.save({"log": log, "local": _local(model.state_dict()), "full": full,
                "optimizer": _local(_optimizer_state(model, opt))},
               os.path.join(out, f"{'resumed' if resume else 'run'}{rank}.pt"))
    if resume:                                          # a 1-process checkpoint loads into 2 sharded processes
        model, opt, ctl = _build(world)
        one = os.path.join(out, f"step{SAVE_AT}-w1")
        ctl.load_state_dict(read_extra(one)["controller"])
        load_sharded(one, model, opt)
        torch.save(_full(model, opt), os.path.join(out, f"from_one_process{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 processes from scratch (checkpoint after SAVE_AT); 1 process likewise (its own checkpoint); then 2 fresh
    processes resuming from the 2-process checkpoint and loading the 1-process one."""
    out = str(tmp_path_factory.mktemp("fsdp"))
    _spawn(_worker, os.path.join(out, "init_run"), out, False)
    one = _train(0, 1, out)
    _spawn(_worker, os.path.join(out, "init_resumed"), out, True)
    load = lambda name: torch.load(os.path.join(out, name), weights_only=True)        # noqa: E731
    return {"out": out, "one": one, "run": [load(f"run{r}.pt") for r in (0, 1)],
            "resumed": [load(f"resumed{r}.pt") for r in (0, 1)],
            "from_one_process": [load(f"from_one_process{r}.pt") for r in (0, 1)]}


def test_sharded_training_follows_one_process(runs):
    """Same global batches; FSDP2 reduce-scatters the mean gradient: equal to one process up to summation order
    and the signs of singular pairs (:func:`_signs_aligned`; ``mid`` flips one). Measured: losses within 4e-7
    relative; every effective weight ``U Σ Vᵀ`` and dense parameter within 4.4e-6, ``U``, ``V``, ``Σ`` within 2.5e-5."""
    model, _, log = runs["one"]
    two = runs["run"][0]
    assert two["log"]["ranks"] == log["ranks"]
    ranks = [tuple(r.values()) for r in log["ranks"]]
    assert ranks[2] != ranks[SAVE_AT - 1] != ranks[-1] and ranks[9] == ranks[10], \
        "the test needs rank changes and an update at unchanged rank (step 11)"
    assert two["log"]["losses"] == pytest.approx(log["losses"], rel=2e-6)
    one, two = model.state_dict(), two["full"]
    assert one.keys() == two.keys()
    effective_one, effective_two = _effective(one), _effective(two)
    for name, t in effective_one.items():
        torch.testing.assert_close(effective_two[name], t, rtol=0, atol=1e-5, msg=name)
    for name, t in _signs_aligned(one, two).items():
        torch.testing.assert_close(two[name], t, rtol=0, atol=2e-4, msg=name)


def test_each_shard_holds_its_rows_of_the_single_process_tensors(runs):
    """Parameters and optimizer state: process p holds rows ``chunk(t, 2)[p]`` of the single-process tensor, up to
    summation order and the signs of singular pairs (:func:`_signs_aligned`): within 5e-4 of the tensor's largest
    entry (measured: 5e-5, in ``U``, ``V`` and Σ's moments)."""
    model, opt, _ = runs["one"]
    tensors = _signs_aligned({**model.state_dict(), **_optimizer_state(model, opt)}, runs["run"][0]["full"])
    for rank in (0, 1):
        shards = {**runs["run"][rank]["local"], **runs["run"][rank]["optimizer"]}
        assert shards.keys() == tensors.keys()
        for name, t in tensors.items():
            rows = t if t.dim() == 0 else t.chunk(2)[rank] if rank < len(t.chunk(2)) else t[:0]
            assert shards[name].shape == rows.shape, name
            torch.testing.assert_close(shards[name], rows, rtol=0, atol=5e-4 * t.abs().max().item(), msg=name)


def test_only_layers_whose_rank_changed_are_resharded(runs):
    """At every update a layer keeps its module (its FSDP2 unit) exactly when it keeps its rank (step 7: ``mid``
    changes rank, ``inp`` does not; step 11: neither)."""
    for rank in (0, 1):
        log = runs["run"][rank]["log"]
        changes = [{name: before[name] == now[name] for name in now}
                   for before, now in zip(log["ranks"], log["ranks"][1:]) if before]
        assert log["kept"][CONFIG["warmup_steps"]:] == changes
        assert {"inp": True, "mid": False} in changes and {"inp": True, "mid": True} in changes


def test_root_takes_in_the_new_units(runs):
    """After the transition the factored layers are units under the root (not roots of their own), the root knows
    exactly its current units, and the dense layers' units are freed (FSDP2's reference cycles: collected at the
    end of the transition)."""
    log = runs["run"][0]["log"]
    assert log["roots"] == {"inp": False, "mid": False}
    assert log["units"] == 3 and log["old_unit_freed"]


def test_sharded_checkpoint_resumes_bit_for_bit(runs):
    for rank in (0, 1):
        run, resumed = runs["run"][rank], runs["resumed"][rank]
        assert resumed["log"]["ranks"] == run["log"]["ranks"][SAVE_AT:]
        assert resumed["log"]["losses"] == run["log"]["losses"][SAVE_AT:]
        for part in ("local", "optimizer"):
            assert resumed[part].keys() == run[part].keys()
            for name, t in run[part].items():
                assert torch.equal(resumed[part][name], t), (rank, part, name)


def test_sharded_checkpoint_loads_into_another_number_of_processes(runs):
    """DCP reshards on load: the 2-process checkpoint into 1 process, the 1-process one into 2 processes; the
    loaded parameters and optimizer state are bitwise the saved run's."""
    model, opt, ctl = _build(1)
    folder = os.path.join(runs["out"], f"step{SAVE_AT}-w2")
    ctl.load_state_dict(read_extra(folder)["controller"])
    load_sharded(folder, model, opt)
    saved = runs["run"][0]["log"]["saved"]
    loaded = _full(model, opt)
    assert loaded.keys() == saved.keys()
    for name, t in saved.items():
        assert torch.equal(loaded[name], t), name
    saved = runs["one"][2]["saved"]
    for rank in (0, 1):
        loaded = runs["from_one_process"][rank]
        assert loaded.keys() == saved.keys()
        for name, t in saved.items():
            assert torch.equal(loaded[name], t), (rank, name)


def _options_worker(rank, world, init_file, out, options):
    _init(rank, world, init_file)
    model, opt, log = _train(rank, world, **options)
    torch.save({"log": log, "full": _full(model, opt)}, os.path.join(out, f"run{rank}.pt"))
    dist.destroy_process_group()


def _follows_one_process(tmp_path, **options) -> tuple[list[dict], dict]:
    """2 sharded processes and 1 process trained with ``CONFIG`` and ``options``: the same ranks at every step,
    losses within 2e-6 relative, every tensor (parameters and optimizer state, gathered) within 5e-4 of its largest
    entry once the signs of singular pairs are matched (:func:`_signs_aligned`). Returns the ranks per step and the
    one process's tensors by name."""
    _spawn(_options_worker, str(tmp_path / "init"), str(tmp_path), options)
    two = torch.load(tmp_path / "run0.pt", weights_only=True)
    model, opt, log = _train(0, 1, **options)
    assert two["log"]["ranks"] == log["ranks"]
    assert two["log"]["losses"] == pytest.approx(log["losses"], rel=2e-6)
    one = _signs_aligned(_full(model, opt), two["full"])
    assert one.keys() == two["full"].keys()
    for name, t in one.items():
        torch.testing.assert_close(two["full"][name], t, rtol=0, atol=5e-4 * t.abs().max().item(), msg=name)
    return log["ranks"], one


def test_trained_bases_follow_one_process(tmp_path):
    """``train_bases``: ``U``, ``V`` train (FSDP2 reduce-scatters their gradients) and their optimizer state is
    carried through rank changes on the gathered layer. Measured: losses within 5e-7 relative, every tensor
    (parameters and optimizer state) within 3e-5 of its largest entry."""
    ranks, tensors = _follows_one_process(tmp_path, train_bases=True)
    assert ranks[-1] != ranks[2] and any(".lowrank_U.exp_avg" in name for name in tensors)


@pytest.mark.parametrize("options", [{}, {"train_bases": True}], ids=["budget", "budget+trained bases"])
def test_budget_follows_one_process(tmp_path, options):
    """``stored_budget``: the transition's ranks come from every weight's singular values, each weight gathered in
    turn (the budget binds: no layer could take one more value), and the updates cut each layer as one process
    does, here changing ranks. Measured: losses within 4e-7 relative, tensors within 2e-5 of their largest entry."""
    ranks = [tuple(r.values()) for r in _follows_one_process(tmp_path, stored_budget=0.8, **options)[0]]
    shapes = [(33, 16), (24, 33)]
    assert _within_one_step(shapes, ranks[2], [min(shape) for shape in shapes], 0.8)
    assert ranks[-1] != ranks[2]


def test_sharded_checkpoint_with_a_budget_resumes_bit_for_bit(tmp_path):
    """``stored_budget``, 2 sharded processes: a checkpoint after a rank change (step ``SAVE_AT``), loaded by 2
    fresh processes, goes on with every loss, rank, parameter and optimizer state entry bitwise equal to the
    uninterrupted run. With ``train_bases`` (``U``, ``V`` and their Adam state) the budget's ranks change at step 7,
    before the checkpoint, and at 9 and 13 after it."""
    options = {"out": str(tmp_path), "stored_budget": 0.9, "train_bases": True}
    _spawn(_options_worker, str(tmp_path / "init_run"), str(tmp_path), options)
    run = torch.load(tmp_path / "run0.pt", weights_only=True)
    _spawn(_options_worker, str(tmp_path / "init_resumed"), str(tmp_path), {**options, "resume": True})
    resumed = torch.load(tmp_path / "run0.pt", weights_only=True)
    ranks = [tuple(r.values()) for r in run["log"]["ranks"]]
    assert ranks[2] != ranks[SAVE_AT - 1] != ranks[-1], "the test needs rank changes before and after the checkpoint"
    assert resumed["log"]["ranks"] == run["log"]["ranks"][SAVE_AT:]
    assert resumed["log"]["losses"] == run["log"]["losses"][SAVE_AT:]
    assert resumed["full"].keys() == run["full"].keys()
    for name, t in run["full"].items():
        assert torch.equal(resumed["full"][name], t), name


def test_checkpoint_taken_at_the_transition_resumes_exactly(tmp_path):
    """Σ has no optimizer state until the step after the transition: the resumed optimizer has none either (DCP's
    template would give it zeros), and the run goes on bitwise as the uninterrupted one (one process)."""
    at = CONFIG["warmup_steps"]
    model, opt, log = _train(0, 1, str(tmp_path), save_at=at)
    resumed, resumed_opt, resumed_log = _train(0, 1, str(tmp_path), resume=True, save_at=at)
    assert resumed_log["losses"] == log["losses"][at:]
    assert _full(resumed, resumed_opt).keys() == _full(model, opt).keys()
    for name, t in _full(model, opt).items():
        assert torch.equal(_full(resumed, resumed_opt)[name], t), name


def test_save_refuses_an_existing_folder(tmp_path):
    model, opt, _ = _build(1)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError, match="exists; save under a new name"):
        save_sharded(str(tmp_path / "ckpt"), model, opt)


def test_shard_refuses_what_it_does_not_support():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"needs every layer it converts sharded as its own unit.*not an FSDP2 "
                                         r"root.*shard_targets\(model, config, shard\)"):
        OIALR(model, opt, OIALRConfig(**CONFIG), shard=lambda m: m)
    with pytest.raises(ValueError, match="wrap= .* or shard= .*, not both"):
        OIALR(model, opt, OIALRConfig(**CONFIG), shard=lambda m: m, wrap=lambda m: m)
    with pytest.raises(ValueError, match=r"does not support augment_bases \(it records the bases' gradients through "
                                         r"hooks, .*\); warmup_steps=\"auto\" \(.*\); train with DDP"):
        OIALR(model, opt, OIALRConfig(**{**CONFIG, "warmup_steps": "auto"}, stored_budget=0.5, augment_bases=True),
              shard=lambda m: m)


def test_parallel_setting_is_checked():
    from oialr.cli.settings import ConfigError, build_config
    with pytest.raises(ConfigError, match="parallel must be one of ddp, fsdp, got 'zero'"):
        build_config({"parallel": "zero"})
    with pytest.raises(ConfigError, match=r"parallel: fsdp does not support method 'galore' \(fsdp trains oialr or "
                                          r"full-rank\), compile: true, oialr.augment_bases; use parallel: ddp"):
        build_config({"parallel": "fsdp", "method": "galore", "compile": True, "oialr": {"augment_bases": True}})
    assert build_config({"parallel": "fsdp", "oialr": {"stored_budget": 0.5}}).parallel == "fsdp"
    assert build_config({}).parallel == "ddp"


def test_training_without_shard_never_loads_the_sharding_modules():
    """One process, through the transition and an update, with the CLI's modules imported: oialr's FSDP2 code is
    never imported (torch's own optimizer step imports parts of FSDP2 for dynamo: not asserted)."""
    code = ("import sys, torch, oialr, oialr.cli.start\n"
            "model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))\n"
            "opt = torch.optim.AdamW(model.parameters())\n"
            "ctl = oialr.OIALR(model, opt, oialr.OIALRConfig(warmup_steps=1, update_every=1))\n"
            "for _ in range(3):\n"
            "    model(torch.randn(4, 8)).sum().backward(); opt.step(); ctl.step()\n"
            "assert ctl.phase == 'low-rank'\n"
            "print(sorted(m for m in sys.modules if m.startswith('oialr.shard')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------- the CLI under torchrun
def test_cli_fsdp_reaches_low_rank_as_one_process(data_dir, tmp_path):  # noqa: F811
    args = ["train", "--dataset", "mnist1d", "--data-dir", data_dir, "--model", "mlp", "--epochs", "2",
            "--set", "oialr.warmup_steps=0.5", "--set", "oialr.update_every=7", "--set", "model_args.width=32",
            "--set", "threads=1", "--set", "parallel=fsdp"]
    runs = {}
    for world in (2, 1):
        out = tmp_path / f"w{world}"
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if world == 2 else []
        proc = subprocess.run([sys.executable, *launch, "-m", "oialr", *args, "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "assuming the intent" not in proc.stderr
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        runs[world] = (json.load(open(out / "results.json")), rows)
        assert {p.name for p in out.iterdir() if p.name.startswith("sharded-")} == {"sharded-62-0"}
    (two, two_rows), (one, one_rows) = runs[2], runs[1]
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 62
    assert two["transition_step"] == one["transition_step"] == 31
    assert [row["ranks"] for row in two_rows] == [row["ranks"] for row in one_rows]
    assert one_rows[0]["ranks"] != one_rows[1]["ranks"], "the test needs a rank change"
    for a, b in zip(two_rows, one_rows):            # measured: 4e-7 relative
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)


STOP_AT = 40                    # a stop poll of 2 processes (every 10 steps), mid-epoch 3 (batch 10 of 15)


def _started(cache, out):
    """A new fsdp run of :func:`tiny` (MNIST-1D cached in ``cache``) in ``out``: 45 steps (3 epochs), a metrics
    row every 10 steps and at the end of each epoch, the transition at step 20 and rank changes at the updates 27,
    34 and 41 (cutoff 0.3)."""
    from oialr.cli.start import start_or_resume
    cfg = tiny(cache, parallel="fsdp", eval_every=10, oialr={"warmup_steps": 20, "update_every": 7, "cutoff": 0.3})
    return start_or_resume(cfg, out, False, log=lambda *args, **kwargs: None)


def _stopped(cache, out):
    """:func:`_started`, stopped after step ``STOP_AT`` (a checkpoint, as at a SIGTERM)."""
    from oialr.cli.interrupts import Interrupted
    run = _started(cache, out)
    real_step = run._train_step

    def step(x, y):
        real_step(x, y)
        if run.step == STOP_AT:
            run._stop_signal = signal.SIGTERM

    run._train_step = step
    with pytest.raises(Interrupted, match=f"SIGTERM at step {STOP_AT}"):
        run.train()


def _resumed(out) -> tuple[int, int]:
    """``oialr train --resume --out out`` (no settings given) in this process; where it resumed."""
    from oialr.cli.start import start_or_resume
    run = start_or_resume(None, out, True, log=lambda *args, **kwargs: None)
    at = run.step, run.batch_in_epoch
    run.train()
    return at


def _world_change_worker(rank, world, init_file, cache, out):
    """2 processes: a run stopped after ``STOP_AT`` (resumed by 1 process in the test), and the 1-process run
    stopped likewise resumed here."""
    _init(rank, world, init_file)
    _stopped(cache, os.path.join(out, "two_to_one"))
    at = _resumed(os.path.join(out, "one_to_two"))
    torch.save(at, os.path.join(out, f"one_to_two_at{rank}.pt"))
    dist.destroy_process_group()


def test_cli_resumes_an_fsdp_run_on_another_number_of_processes(data_dir, tmp_path):  # noqa: F811
    """``oialr train --resume`` (:func:`oialr.cli.start.start_or_resume`, no settings given) of a ``parallel: fsdp``
    run stopped mid-epoch after rank changes, 2 processes → 1 and 1 → 2: it goes on from the same step and batch,
    and every metrics row (ranks; train loss since the row before, whose sums the other number of processes saved;
    test loss) and the final weights ``U Σ Vᵀ`` equal the uninterrupted 1-process run up to summation order.
    Measured: 2 → 1 losses within 1.5e-7 relative, weights within 1e-6; 1 → 2 within 1.2e-8 and 3e-8."""
    from safetensors.torch import load_file
    _stopped(data_dir, str(tmp_path / "one_to_two"))
    _spawn(_world_change_worker, str(tmp_path / "init"), data_dir, str(tmp_path))
    assert _resumed(str(tmp_path / "two_to_one")) == (STOP_AT, 10)
    assert [torch.load(tmp_path / f"one_to_two_at{r}.pt") for r in (0, 1)] == [(STOP_AT, 10)] * 2
    _started(data_dir, str(tmp_path / "straight1")).train()
    runs = {name: ([json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")],
                   _effective(load_file(tmp_path / name / "model" / "model.safetensors")))
            for name in ("straight1", "two_to_one", "one_to_two")}
    for name in runs:
        assert [p.name for p in (tmp_path / name).iterdir() if p.name.startswith("sharded-")] == ["sharded-45-0"]
    rows, weights = runs.pop("straight1")
    ranks = [row["ranks"] for row in rows]
    assert [row["step"] for row in rows] == [10, 15, 20, 30, 40, 45]
    assert ranks[2] != ranks[3] != ranks[4] != ranks[5], "the test needs rank changes before and after the stop"
    for name, (other_rows, other_weights) in runs.items():
        assert [row["ranks"] for row in other_rows] == ranks, name
        for a, b in zip(other_rows, rows):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5), name
            assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5), name
        assert other_weights.keys() == weights.keys()
        for key, t in weights.items():
            torch.testing.assert_close(other_weights[key], t, rtol=0, atol=2e-5, msg=f"{name}: {key}")
    assert [json.load(open(tmp_path / name / "results.json"))["world_size"] for name in runs] == [1, 2]
