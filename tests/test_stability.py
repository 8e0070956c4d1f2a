import copy
import csv
import io
import json
import math
import warnings

import pytest
import torch
from torch import nn

import oialr
from oialr import OIALR, OIALRConfig, linalg
from oialr import PlateauRule
from oialr.stability import StabilityTracker, layer_names, weight_matrix
from oialr.stability_metrics import basis_stability, spectrum_stats
from models import CrossAttention, batches, transformer


def _factors(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return u, v


def _reference(w1, w2):
    """Mean column cosine of the SVD polar factors of the two weights (viewed as tall matrices)."""
    qs = []
    for w in (w1, w2):
        w = w.reshape(w.shape[0], -1).double()
        u, _, vh = torch.linalg.svd(w if w.shape[0] >= w.shape[1] else w.T, full_matrices=False)
        qs.append(u @ vh)
    return nn.functional.cosine_similarity(qs[0], qs[1], dim=0).mean().item()


# ---------------------------------------------------------------------------------------------------- the metric
def test_identity_rescaling_and_negation():
    u, v = _factors(12, 7, 7)
    s = torch.linspace(3.0, 0.5, 7, dtype=torch.float64)
    w = u @ torch.diag(s) @ v.T
    assert basis_stability(w, w) == pytest.approx(1.0, abs=1e-12)
    assert basis_stability(w, u @ torch.diag(s.flip(0) ** 2 + 0.1) @ v.T) == pytest.approx(1.0, abs=1e-12)
    assert basis_stability(w, -w) == pytest.approx(-1.0, abs=1e-12)
    assert basis_stability(w.float(), w.float() * 5) == pytest.approx(1.0, abs=1e-6)


def test_independent_of_svd_signs():
    u, v = _factors(10, 6, 6)
    flips = torch.tensor([1.0, -1, 1, -1, -1, 1], dtype=torch.float64)
    w1 = u @ torch.diag(torch.arange(6, 0, -1.0, dtype=torch.float64)) @ v.T
    w2 = (u * flips) @ torch.diag(torch.arange(1, 7.0, dtype=torch.float64)) @ (v * flips).T
    naive = nn.functional.cosine_similarity(u, u * flips, dim=0).mean().item()    # what a U-only cosine would say
    assert naive == pytest.approx(0.0, abs=1e-12)
    assert basis_stability(w1, w2) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(20, 8), (6, 15), (8, 3, 3, 3), (5, 4, 2)], ids=["tall", "wide", "conv2d", "3d"])
def test_equals_mean_column_cosine_of_svd_polar_factors(shape):
    w1 = torch.randn(shape)
    w2 = w1 + 0.5 * torch.randn(shape)
    expected = _reference(w1, w2)
    assert 0.2 < expected < 0.99
    assert basis_stability(w1, w2) == pytest.approx(expected, abs=1e-10)
    assert basis_stability(w1.float(), w2.float()) == pytest.approx(expected, abs=1e-6)


def test_rank_deficient_and_zero():
    u, v = _factors(16, 8, 3)
    w1 = u @ torch.diag(torch.tensor([3.0, 2, 1], dtype=torch.float64)) @ v.T
    w2 = u @ torch.diag(torch.tensor([1.0, 5, 2], dtype=torch.float64)) @ v.T
    assert basis_stability(w1, w2) == pytest.approx(1.0, abs=1e-10)          # same rank-3 basis: U_r V_rᵀ / 3
    assert basis_stability(w1.float(), w2.float()) == pytest.approx(1.0, abs=1e-6)
    fu, _ = linalg.orthonormalize(torch.cat([u, torch.randn(16, 5, dtype=torch.float64)], 1))   # fu[:, :3] = u
    fv, _ = linalg.orthonormalize(torch.cat([v, torch.randn(8, 5, dtype=torch.float64)], 1))
    full_rank = fu @ torch.diag(torch.tensor([3.0, 2, 1, 1, 1, 1, 1, 1], dtype=torch.float64)) @ fv.T
    # rank fell from 8 to 3, the 3 kept directions unchanged: 3 / max(8, 3)
    assert basis_stability(full_rank, w1) == pytest.approx(3 / 8, abs=1e-10)
    q, s = linalg.polar_factor(w1)
    torch.testing.assert_close(q, u @ v.T)
    torch.testing.assert_close(s, torch.tensor([3.0, 2, 1, 0, 0, 0, 0, 0], dtype=torch.float64), atol=1e-7, rtol=0)
    zero = torch.zeros(16, 8)
    assert basis_stability(zero, zero) == 0.0
    assert basis_stability(zero, w1) == 0.0
    assert math.isnan(basis_stability(w1, torch.full_like(w1, math.nan)))


def test_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"same weight, got shapes \(4, 3\) \(w_prev\) and \(3, 4\) \(w_now\)"):
        basis_stability(torch.randn(4, 3), torch.randn(3, 4))
    with pytest.raises(ValueError, match="at least 2 dimensions.*w_now is a 1-D tensor"):
        basis_stability(torch.randn(4, 3), torch.randn(12))
    with pytest.raises(ValueError, match="w_prev is a 0-D tensor"):
        basis_stability(torch.tensor(1.0), torch.tensor(1.0))


def test_batched_polar_factor_equals_one_by_one():
    w = torch.randn(5, 9, 4, dtype=torch.float64)
    q, s = linalg.polar_factor(w)
    for i in range(5):
        q_i, s_i = linalg.polar_factor(w[i])
        torch.testing.assert_close(q[i], q_i)
        torch.testing.assert_close(s[i], torch.linalg.svdvals(w[i]))
        torch.testing.assert_close(q[i].T @ q[i], torch.eye(4, dtype=torch.float64))
    model = nn.Sequential(*[nn.Linear(6, 10) for _ in range(3)], nn.Linear(10, 6))      # one shape: one eigh
    tracker = StabilityTracker(model, every=1)
    before = {name: weight_matrix(model, name).clone() for name in tracker.layers}
    tracker.step()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    record = tracker.step()
    for name, w in before.items():
        expected = basis_stability(w, weight_matrix(model, name))
        assert expected < 0.99 and record["layers"][name]["stability"] == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------------- the tracker
def _train(model, opt, data, *hooks):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for hook in hooks:
            hook.step()


def test_samples_at_multiples_of_every_and_evaluation_advances_nothing():
    model = transformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = StabilityTracker(model, every=3)
    data = batches((4, 5, 16), 3, 10)
    returned = []
    for x, y in data:
        _train(model, opt, [(x, y)])
        returned.append(tracker.step() is not None)
        with torch.no_grad():                                   # evaluation between steps
            model.eval(), model(x), model.train()
    assert [r["step"] for r in tracker.records] == [3, 6, 9]
    assert returned == [(i + 1) % 3 == 0 for i in range(10)]
    assert tracker.step_count == 10
    first = tracker.records[0]
    assert first["network_stability"] is None and first["weighted_stability"] is None
    assert all(v["stability"] is None and v["sigma_max"] > 0 for v in first["layers"].values())
    assert all(0.5 < r["network_stability"] <= 1.0 for r in tracker.records[1:])


def test_layer_names_follow_oialr():
    names = [f"0.layers.{i}.{p}" for i in range(2) for p in
             ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")] + ["2"]
    assert StabilityTracker(transformer()).layers == names
    assert layer_names(CrossAttention()) == ["inp", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                                             "head"]
    model = CrossAttention()
    assert weight_matrix(model, "attn.k_proj") is not None and weight_matrix(model, "attn.k_proj").shape == (16, 6)
    with pytest.raises(ValueError, match=r"layers \['attn\.in_proj'\] are not weight matrices of the model"):
        StabilityTracker(model, layers=["attn.in_proj"])
    with pytest.raises(ValueError, match=r"every must be an integer >= 1.*\n.*cutoff must be a number in \[0, 1\)"):
        StabilityTracker(model, every=0, cutoff=1.5)


def test_unchanged_weight_gives_one():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model[2].parameters(), lr=0.5)           # the first layer is not trained
    tracker = StabilityTracker(model, every=2)
    _train(model, opt, batches((8, 8), 4, 4), tracker)
    layers = tracker.records[-1]["layers"]
    assert layers["0"]["stability"] == pytest.approx(1.0, abs=1e-6)     # Q is kept in float32 between samples
    assert layers["2"]["stability"] < 1 - 1e-6


def test_across_an_oialr_transition():
    model = transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=3, update_every=2, cutoff=0.3))
    tracker = StabilityTracker(model, every=2)
    _train(model, opt, batches((4, 5, 16), 3, 8), ctl, tracker)
    assert [r["step"] for r in tracker.records] == [2, 4, 6, 8] and ctl.transition_step == 3
    lowrank = ctl.lowrank_layers()
    assert isinstance(model.get_submodule("0.layers.0.self_attn.in_proj"), oialr.LowRankLinear)
    for record in tracker.records:
        assert list(record["layers"]) == tracker.layers
    for record in tracker.records[1:]:
        for name, values in record["layers"].items():
            assert -1.0 <= values["stability"] <= 1.0 + 1e-9, name
    for name, layer in lowrank.items():                        # measured on U Σ Vᵀ: exactly rank r
        assert tracker.records[-1]["layers"][name]["rank_at_cutoff"] <= layer.rank
    assert min(ly.rank for ly in lowrank.values()) < 16      # some rank was cut, so the weights are rank-deficient
    assert tracker.records[-1]["network_stability"] > 0.5


def test_factored_conv_is_measured_on_its_dense_product():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    before = {name: weight_matrix(model, name).clone() for name in layer_names(model)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    OIALR(model, opt, OIALRConfig(warmup_steps=0, cutoff=0.0))                 # converts now, at full rank
    assert isinstance(model[0], oialr.LowRankConv)
    after = weight_matrix(model, "0")
    assert after.dtype == torch.float64 and after.shape == (8, 27)
    torch.testing.assert_close(after, before["0"].double(), atol=1e-6, rtol=0)
    assert basis_stability(before["0"], after) == pytest.approx(1.0, abs=1e-6)


def test_low_precision_weights_under_autocast():
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4)).bfloat16()
    tracker = StabilityTracker(model, every=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracker.step()
        record = tracker.step()
    assert record["network_stability"] == pytest.approx(1.0, abs=1e-6)
    expected = torch.linalg.svdvals(model[0].weight.double())[0].item()
    assert record["layers"]["0"]["sigma_max"] == pytest.approx(expected, rel=1e-9)


def test_network_means_on_a_hand_made_case():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))          # 8x4 (32 params) and 2x8 (16 params)
    tracker = StabilityTracker(model, every=1)
    tracker.step()
    with torch.no_grad():
        model[1].weight.neg_()
    record = tracker.step()
    assert record["layers"]["0"]["stability"] == pytest.approx(1.0) and record["layers"]["0"]["shape"] == [8, 4]
    assert record["layers"]["1"]["stability"] == pytest.approx(-1.0)
    assert record["network_stability"] == pytest.approx(0.0, abs=1e-6)
    assert record["weighted_stability"] == pytest.approx((32 - 16) / 48)


def test_spectrum_statistics_and_mixing():
    s = torch.tensor([4.0, 2.0, 1.0, 0.3, 0.05], dtype=torch.float64)
    u, v = _factors(9, 5, 5)
    model = nn.Sequential(nn.Linear(5, 9))
    with torch.no_grad():
        model[0].weight.copy_(u @ torch.diag(s) @ v.T)
    tracker = StabilityTracker(model, every=1, cutoff=0.1, mixing=True)
    values = tracker.step()["layers"]["0"]
    p = s / s.sum()
    assert values["sigma_max"] == pytest.approx(4.0)
    assert values["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    assert values["rank_at_cutoff"] == 3 and values["mixing"] is None
    with torch.no_grad():
        model[0].weight.mul_(2.0)                                   # same basis, R doubles
    values = tracker.step()["layers"]["0"]
    assert values["stability"] == pytest.approx(1.0, abs=1e-6) and values["mixing"] == pytest.approx(1.0, abs=1e-5)
    w1 = torch.randn(7, 4, dtype=torch.float64)
    w2 = w1 + 0.1 * torch.randn(7, 4, dtype=torch.float64)
    r1, r2 = (torch.linalg.qr(w)[1] for w in (w1, w2))
    r1, r2 = (r * torch.sign(torch.diagonal(r))[:, None] for r in (r1, r2))
    torch.testing.assert_close(linalg.qr_r_factor(torch.stack([w1, w2])), torch.stack([r1, r2]))
    assert [t.item() for t in spectrum_stats(torch.zeros(3, dtype=torch.float64), 0.1)] == [0, 0, 0]


def test_non_finite_weights_are_recorded_as_none():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    tracker = StabilityTracker(model, every=1)
    tracker.step()
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf
    with pytest.warns(UserWarning, match="layer '0' has non-finite weights at step 2"):
        record = tracker.step()
    assert record["layers"]["0"]["stability"] is None and record["layers"]["0"]["sigma_max"] is None
    assert record["network_stability"] == pytest.approx(1.0)


def test_results_files(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Conv1d(6, 3, 1))
    tracker = StabilityTracker(model, every=1, mixing=True)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(0.1 * torch.randn(6, 4))
        tracker.step()
    tracker.write_jsonl(tmp_path / "s.jsonl")
    tracker.write_csv(tmp_path / "s.csv")
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == tracker.records
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(rows) == 3 * (2 + 2)
    assert [r["layer"] for r in rows[:4]] == ["0", "2", "network:mean", "network:weighted"]
    assert rows[0]["stability"] == "" and rows[0]["rows"] == "6" and rows[0]["cols"] == "4"
    last = {r["layer"]: r for r in rows if r["step"] == "3"}
    assert float(last["network:weighted"]["stability"]) == pytest.approx(tracker.records[-1]["weighted_stability"])
    assert float(last["0"]["mixing"]) > 0 and last["2"]["rank_at_cutoff"] == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.jsonl"]     # no temporary file left


def test_state_dict_round_trip():
    def perturb(model, step):
        g = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))

    model = transformer()
    tracker = StabilityTracker(model, every=2, mixing=True, lag=2)
    for step in range(4):
        perturb(model, step), tracker.step()
    buffer = io.BytesIO()
    torch.save({"model": copy.deepcopy(model.state_dict()), "tracker": tracker.state_dict()}, buffer)
    for step in range(4, 8):
        perturb(model, step), tracker.step()
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed_model = transformer()
    resumed_model.load_state_dict(saved["model"])
    resumed = StabilityTracker(resumed_model, every=2, mixing=True, lag=2)
    resumed.load_state_dict(saved["tracker"])
    assert resumed.step_count == 4 and len(resumed.records) == 2
    for step in range(4, 8):
        perturb(resumed_model, step), resumed.step()
    assert resumed.records == tracker.records
    assert resumed.records[-1]["layers"][resumed.layers[0]]["stability"] is not None
    with pytest.raises(ValueError, match="(?s)other settings.*\n  every: saved 2, here 3\n  lag: saved 2, here 1"):
        StabilityTracker(model, every=3, mixing=True).load_state_dict(saved["tracker"])
    with pytest.raises(ValueError, match=r"not a state dict of StabilityTracker version 2 \(got a dict with version 1"):
        resumed.load_state_dict({**saved["tracker"], "version": 1})


class StepClock:
    """A stand-in for :mod:`time` in :mod:`oialr.stability` whose ``perf_counter`` moves only when told: a training
    step of ``step`` seconds before each ``tracker.step()``, ``sample`` seconds inside each sample. The overhead is
    then exact whatever the load on the machine."""

    def __init__(self, monkeypatch, tracker: StabilityTracker, step: float, sample: float) -> None:
        self.now, self.step_seconds, self.tracker = 0.0, step, tracker
        monkeypatch.setattr(oialr.stability, "time", self)
        measure = tracker.sample

        def timed_sample():
            self.now += sample
            return measure()
        monkeypatch.setattr(tracker, "sample", timed_sample)

    def perf_counter(self) -> float:
        return self.now

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.now += self.step_seconds
            self.tracker.step()


def test_overhead_is_measured_and_a_costly_every_is_warned_about(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    real = StabilityTracker(model, every=1)
    assert real.overhead is None
    for _ in range(3):
        real.step()
    assert 0 < real.overhead <= 1                   # the real clock: a share of the wall time, whatever the load
    slow = StabilityTracker(model, every=1)
    clock = StepClock(monkeypatch, slow, step=0.25, sample=2 ** -10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clock.train(5)                              # a training step much longer than a sample: no warning
    # timed from the end of the first sample: 4 samples of 2^-10 s in 4 × (0.25 + 2^-10) s
    assert slow.overhead == pytest.approx(1 / 257)
    fast = StabilityTracker(model, every=1)
    clock = StepClock(monkeypatch, fast, step=0.125, sample=0.5)
    with pytest.warns(UserWarning) as caught:
        clock.train(6)                              # samples 4× a step: warned once, at the fourth sample
    # at the fourth sample 3 × 0.5 s of 3 × 0.625 s; a sample is 4 steps, so 5% needs every >= ceil(4 · 19)
    assert [str(w.message) for w in caught] == [
        "StabilityTracker: sampling took 80% of the time since the first sample at every=1; sample every >= 76 "
        "steps to keep it under 5% (StabilityTracker(every=...), OIALRConfig.auto.every, or oialr train --set "
        "stability_every=...)"]
    assert fast.overhead == pytest.approx(5 * 0.5 / (5 * 0.625))


def test_lag_compares_with_the_sample_lag_samples_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    tracker = StabilityTracker(model, every=2, lag=3, mixing=True)
    weights, records = [], []
    for _ in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        record = tracker.step()
        if record is not None:
            weights.append({name: weight_matrix(model, name).clone() for name in tracker.layers})
            records.append(record)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12] and {r["lag_steps"] for r in records} == {6}
    assert all(r["network_stability"] is None and r["layers"]["0"]["mixing"] is None for r in records[:3])
    for k in range(3, 6):
        for name in tracker.layers:
            expected = basis_stability(weights[k - 3][name], weights[k][name])
            assert records[k]["layers"][name]["stability"] == pytest.approx(expected, abs=1e-6)
    assert all(len(tracker._q[name]) == 3 for name in tracker.layers)     # memory: `lag` snapshots per layer
    with pytest.raises(ValueError, match=r"lag must be an integer >= 1"):
        StabilityTracker(model, lag=0)


# ---------------------------------------------------------------------------------------------------- the rule
def _feed(rule, series, every=50, until=20000):
    for step in range(every, until + 1, every):
        if rule.update(step, series(step)):
            return step
    return None


def test_rule_fires_on_a_plateau_and_not_before_min_steps():
    plateau = lambda step: 1 - 0.5 * math.exp(-step / 300)
    # >= 0.99 from step ~1174; the spread over 4 samples (150 steps) is 0.324·exp(-step/300) <= 0.002 from ~1526
    rule = PlateauRule()
    assert _feed(rule, plateau) == 1550
    assert rule.fired and rule.fired_step == 1550
    assert rule.reason == ("network stability 0.9971 >= 0.99 and changed by 0.0019 <= 0.002 over the last 4 samples "
                           "at step 1550")
    assert rule.update(1600, 0.2) is True                    # stays fired
    assert _feed(PlateauRule(min_steps=3000), plateau) == 3000
    assert _feed(PlateauRule(threshold=0.9, epsilon=0.01), plateau) == 1050


def test_rule_waits_for_a_rising_series_until_max_steps():
    ramp = lambda step: 0.5 + 0.99 * step / 10000               # changes by 0.015 per 4 samples: never a plateau
    assert _feed(PlateauRule(), ramp, until=4950) is None
    rule = PlateauRule(max_steps=5000)
    assert _feed(rule, ramp) == 5000
    assert rule.reason == "max_steps reached: step 5000 >= max_steps 5000 (network stability 0.9950)"
    rule = PlateauRule(max_steps=100, min_steps=0)
    assert rule.update(50, None) is False and rule.update(100, None) is True
    assert "network stability none yet" in rule.reason


def test_rule_validation_and_state():
    with pytest.raises(ValueError, match=r"threshold must be a number in \(-1, 1\].*\n.*window must be an integer "
                                         r">= 1.*\n.*epsilon must be a number in \[0, 2\]"):
        PlateauRule(threshold=1.5, window=0, epsilon=-0.1)
    with pytest.raises(ValueError, match="max_steps must be None or >= min_steps \\(200\\), got 100"):
        PlateauRule(max_steps=100)
    with pytest.raises(ValueError, match="min_steps must be an integer >= 0, got 1.5"):
        PlateauRule(min_steps=1.5)
    plateau = lambda step: 1 - 0.5 * math.exp(-step / 300)
    rule = PlateauRule()
    assert _feed(rule, plateau, until=900) is None
    buffer = io.BytesIO()
    torch.save(rule.state_dict(), buffer)
    resumed = PlateauRule()
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert next(s for s in range(950, 3000, 50) if resumed.update(s, plateau(s))) == 1550
    with pytest.raises(ValueError, match="increasing step order: got step 900 after step 1550"):
        resumed.update(900, 0.5)
    with pytest.raises(ValueError, match="(?s)other settings.*window: saved 4, here 3"):
        PlateauRule(window=3).load_state_dict(rule.state_dict())
    with pytest.raises(ValueError, match=r"not a state dict of PlateauRule version 1 \(got a list"):
        PlateauRule().load_state_dict([])
