"""benchmarks/: the staged basis update does what update_bases() does; measuring returns plain data that rendering
turns into the same text; forced paths go through oialr.force_path."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oialr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import breakdown
    import step_time
    import workloads
    return breakdown, step_time, workloads


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 10))


def tiny_workload(workloads):
    return workloads.Workload("tiny", "an MLP 16 -> 32 -> 24 -> 10, batch 8", 8, (16,), mlp,
                              configs=(workloads.FULL_RANK, "f=0.5", workloads.REBUILD))


def trained_controller(cutoff: float) -> oialr.OIALR:
    """An MLP converted at rank fraction 1 with ``cutoff``, one AdamW step on Σ, a basis ``U`` drifted from
    orthonormal so that the update re-orthonormalizes it, and a ``Σ`` with three weak rows that the update drops."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = oialr.OIALR(model, optimizer, oialr.OIALRConfig(warmup_steps=0, cutoff=cutoff, rank_fraction=1.0))
    F.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 10, (8,))).backward()
    optimizer.step()
    with torch.no_grad():
        model[0].lowrank_U.mul_(1.001)
        model[2].lowrank_S[-3:].mul_(1e-3)
    return ctl


def test_staged_update_is_update_bases_stage_by_stage(bench):
    breakdown, _, _ = bench
    staged, real = trained_controller(0.3), trained_controller(0.3)
    ranks = {name: layer.rank for name, layer in real.lowrank_layers().items()}
    timer = breakdown.StageTimer()
    breakdown.staged_update(staged, timer)
    real.update_bases()
    assert {name: layer.rank for name, layer in real.lowrank_layers().items()} != ranks      # a rank fell
    assert set(timer.seconds) == set(breakdown.UPDATE_STAGES) and all(s >= 0 for s in timer.seconds.values())
    for (name, a), b in zip(staged.lowrank_layers().items(), real.lowrank_layers().values()):
        assert a.rank == b.rank, name
        for t_a, t_b in zip((a.lowrank_U, a.lowrank_S, a.lowrank_V), (b.lowrank_U, b.lowrank_S, b.lowrank_V)):
            torch.testing.assert_close(t_a, t_b, rtol=0, atol=0)
        state_a, state_b = staged.optimizer.state[a.lowrank_S], real.optimizer.state[b.lowrank_S]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)


def test_update_breakdown_reports_its_stages_and_a_real_update(bench):
    breakdown, _, workloads = bench
    trainer = workloads.Trainer(tiny_workload(workloads), workloads.CONFIGS["f=0.5"])
    result = breakdown.update_breakdown(trainer, repeats=2)
    assert list(result) == breakdown.UPDATE_STAGES + ["sum of stages", "update_bases()"]
    assert result["sum of stages"] == pytest.approx(sum(result[k] for k in breakdown.UPDATE_STAGES))
    assert result["update_bases()"] > 0
    text = breakdown.update_text({"tiny f=0.5": result}, repeats=2)
    assert "| **sum of stages** |" in text and "| **`update_bases()`** |" in text
    assert text == breakdown.update_text(json.loads(json.dumps({"tiny f=0.5": result})), repeats=2)


def test_forced_paths_go_through_force_path(bench):
    breakdown, _, workloads = bench
    layer = oialr.LowRankLinear(torch.linalg.qr(torch.randn(32, 4))[0], torch.randn(4, 4),
                                torch.linalg.qr(torch.randn(16, 4))[0], None)
    assert layer.path(64) == "chain"
    with workloads.CONFIGS[workloads.REBUILD].path_context():
        assert layer.path(64) == "dense"
    with workloads.CONFIGS["f=0.25"].path_context():
        assert layer.path(64) == "chain"
    x = torch.randn(64, 16, requires_grad=True)
    saved = {path: breakdown.saved_tensors(layer, x, path) for path in oialr.layers.PATHS}
    shapes = {path: [shape for shape, _ in items] for path, items in saved.items()}
    assert shapes["chain"] == [(64, 4)] and (64, 16) in shapes["dense"]       # only the chain does not keep x


def test_step_time_measures_plain_data_and_renders_it(bench):
    _, step_time, workloads = bench
    numbers = step_time.measure(tiny_workload(workloads), repeats=2, steps=1, warmup=0, threads=1, memory=False)
    plain = json.loads(json.dumps(numbers))                 # nothing but numbers, strings, lists and dicts
    assert set(numbers["ratio"]) == {workloads.FULL_RANK, "f=0.5", workloads.REBUILD}
    assert list(numbers["update"]) == ["f=0.5"]             # the forced-path config has no update row
    text = step_time.render(numbers)
    assert text.startswith("### tiny: an MLP 16 -> 32 -> 24 -> 10, batch 8\n")
    assert "| f=0.5 |" in text and "Memory of a steady-state" not in text
    assert step_time.render({**plain, "layers": numbers["layers"]}) == text
