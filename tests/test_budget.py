"""The size budget: ranks allocated across layers (oialr.budget) and the controller that meets it."""
import copy
import io

import pytest
import torch
from torch import nn

from oialr import OIALR, OIALRConfig
from oialr.cli.settings import ConfigError, build_config
from oialr.budget import (allocate_ranks, check_budget, marginal_cost, min_stored_fraction, stored_fraction,
                          update_ranks)
from oialr.factorize import cut_rank, stored_params
from oialr.output_sample import output_values, sample_rows
from models import MODELS, batches


def _within_one_step(shapes, ranks, caps, budget):
    """Stored <= budget, and no layer below its cap could take one more value."""
    dense = sum(m * n for m, n in shapes)
    stored = sum(stored_params(m, n, r) for (m, n), r in zip(shapes, ranks))
    room = budget * dense - stored
    return room >= 0 and all(r >= c or marginal_cost(m, n, r) > room for (m, n), r, c in zip(shapes, ranks, caps))


def test_allocation_meets_the_budget_within_one_rank_step_per_layer():
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32, 32), (128, 16), (48, 96)]
    spectra = [torch.sort(torch.rand(min(s), generator=g) ** k, descending=True).values
               for s, k in zip(shapes, (1, 3, 6, 2))]
    caps = [min(s) for s in shapes]
    for budget in (0.1, 0.25, 0.5, 0.9):
        ranks = allocate_ranks(spectra, shapes, budget, [1] * 4, caps)
        assert _within_one_step(shapes, ranks, caps, budget), (budget, ranks)
        assert stored_fraction(shapes, ranks) <= budget


def test_allocation_favours_the_layer_whose_energy_is_concentrated():
    """Same shapes, budget 256 of 512: a layer with one dominant value keeps it, a flat one takes the budget (rank 1
    each stores 66; the flat layer's values 2-5 cost 35+37+39+41 = 152; its 6th (43) no longer fits in the 38 left,
    where the steep layer's second value (35) still does)."""
    steep = torch.tensor([10.0] + [0.01] * 15)
    flat = torch.ones(16)
    ranks = allocate_ranks([steep, flat], [(16, 16), (16, 16)], 0.5, [1, 1], [16, 16])
    assert ranks == [2, 5]
    assert _within_one_step([(16, 16)] * 2, ranks, [16, 16], 0.5)


def test_allocation_weighs_the_squared_error_against_the_cost():
    """Flat spectra in a 64x16 and a 16x16 layer, whose values cost 81+2r and 33+2r: the squared errors give the
    cheaper layer more (8) without starving the wide one (2); the summed error per parameter would leave the wide
    layer at rank 1 and give the narrow one 10, the largest error minimised would give both 4 (blind to cost)."""
    flat = torch.ones(16)
    ranks = allocate_ranks([flat, flat], [(64, 16), (16, 16)], 0.4, [1, 1], [16, 16])
    assert ranks == [2, 8]
    assert _within_one_step([(64, 16), (16, 16)], ranks, [16, 16], 0.4)


def test_allocation_reads_the_output_scales_not_the_singular_values():
    """Two 64x64 layers with the same singular values (16 kept); in the first the trailing 8 components carry most
    of the output, in the second the leading 8: from the output scales the first takes more rank (reaching its
    strong components past weak ones, which one value at a time would not), from the singular values alone both
    get about the same."""
    s = torch.linspace(2, 1, 16)
    tail_heavy = s * torch.cat([torch.ones(8), torch.full((8,), 10.0)])
    head_heavy = s * torch.cat([torch.full((8,), 10.0), torch.full((8,), 0.1)])
    shapes = [(64, 64)] * 2
    assert allocate_ranks([tail_heavy, head_heavy], shapes, 0.3, [1, 1], [16, 16]) == [12, 5]
    assert allocate_ranks([s, s], shapes, 0.3, [1, 1], [16, 16]) == [9, 8]


def test_output_values_are_the_components_output_scales():
    """``√mean (Y u_i)²`` of output rows ``Y = X Wᵀ`` equals ``s_i √mean (X v_i)²`` (float64, exact up to rounding);
    no rows, or rows of zeros, give the singular values back."""
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(12, 9, generator=g, dtype=torch.float64), torch.randn(50, 9, generator=g, dtype=torch.float64)
    X[:, 0] *= 30                                   # an anisotropic input
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    expected = s * (X @ Vh.mT).pow(2).mean(0).sqrt()
    torch.testing.assert_close(output_values(s, U, X @ W.mT), expected)
    assert output_values(s, U, None) is s and output_values(s, U, torch.zeros(5, 12)) is s


def test_sampled_rows_put_channels_last_and_remove_the_bias():
    g = torch.Generator().manual_seed(0)
    conv_out, bias = torch.randn(6, 5, 4, 4, generator=g), torch.randn(5, generator=g)
    rows = sample_rows(conv_out, bias, channel_dim=1, rows=40)    # 16 positions per image: 3 images of 6
    assert rows.shape == (40, 5)
    torch.testing.assert_close(rows[:16], conv_out[0].permute(1, 2, 0).reshape(16, 5) - bias)
    torch.testing.assert_close(rows[16:32], conv_out[2].permute(1, 2, 0).reshape(16, 5) - bias)
    tokens = torch.randn(4, 100, 3, generator=g)
    rows = sample_rows(tokens, None, channel_dim=-1, rows=100)    # every 4th of 400 rows
    torch.testing.assert_close(rows, tokens.reshape(400, 3)[::4])
    rows[0, 0] = 123.0
    assert tokens.reshape(400, 3)[0, 0] != 123.0                  # a copy


def _first_layer_model():
    """A first layer ``W = U diag(s) Vᵀ`` (32x4, ``s = 100, 10, 1, 0.01``) whose input lies along ``v_4``, the
    weakest right singular vector; then a 32x32 layer and a head (kept dense)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32, bias=False), nn.Linear(32, 32), nn.Linear(32, 3))
    U, _, Vh = torch.linalg.svd(torch.randn(32, 4), full_matrices=False)
    with torch.no_grad():
        model[0].weight.copy_(U @ torch.diag(torch.tensor([100.0, 10.0, 1.0, 0.01])) @ Vh)
    x = 100 * torch.randn(64, 1) * Vh[-1] + 1e-4 * torch.randn(64, 4)
    return model, x


@pytest.mark.parametrize("recorded", [True, False])
def test_the_budget_keeps_what_the_recorded_outputs_need(recorded):
    """The transition's allocation weighs each component by its output on the last training batch: the first layer,
    whose input lies along its weakest singular direction, keeps its full rank (its output unchanged) when a
    training forward was recorded; from the singular values alone (an evaluation-mode forward is not recorded) its
    weakest value goes, and its output with it."""
    model, x = _first_layer_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=1, cutoff=0.0, stored_budget=0.4))
    before = model.eval()[0](x).detach()
    model.train(recorded)
    model(x).sum().backward()
    opt.step()
    ctl.step()
    ranks = [layer.rank for layer in ctl.lowrank_layers().values()]
    error = ((model[0](x) - before).norm() / before.norm()).item()
    if recorded:
        assert ranks[0] == 4 and error < 1e-2, (ranks, error)
    else:
        assert ranks[0] < 4 and error > 0.9, (ranks, error)
    assert ctl.summary()["stored_fraction"] <= 0.4


def test_recording_leaves_copies_and_saving_alone():
    """Only the controller's model records into its sampler (a deep copy, e.g. an averaged model, records into its
    own copy), the model still pickles whole, and rows of another width fall back to the singular values."""
    model, x = _first_layer_model()
    ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.0), OIALRConfig(warmup_steps=1, stored_budget=0.4))
    model(x)
    rows = ctl._outputs.rows["0"]
    assert rows.shape == (64, 32) and sorted(ctl._outputs.rows) == ["0", "1"]
    copy.deepcopy(model)(2 * x)
    assert ctl._outputs.rows["0"] is rows
    torch.save(model, io.BytesIO())
    s = torch.ones(4)
    assert output_values(s, torch.eye(32)[:, :4], torch.ones(3, 31)) is s


@pytest.mark.parametrize("augment", [False, True])
def test_outputs_are_recorded_only_in_the_steps_that_allocate(augment):
    """The layers carry the recording hooks only during the step whose end runs an allocation: the transition's
    (step 3), and with augment_bases every update's (steps 5, 7); other steps run hook-free and keep no rows. A
    resumed controller arms the same steps."""
    model, x = _first_layer_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    config = OIALRConfig(warmup_steps=3, update_every=2, cutoff=0.0, stored_budget=0.6, augment_bases=augment)
    ctl = OIALR(model, opt, config)
    armed = []
    for step in range(1, 8):
        model(x).sum().backward()
        hooks = [len(model[i]._forward_hooks) for i in (0, 1)]
        armed.append(hooks == [1, 1] and sorted(ctl._outputs.rows) == ["0", "1"])
        assert armed[-1] or (hooks == [0, 0] and not ctl._outputs.rows), (step, hooks)
        opt.step()
        opt.zero_grad()
        ctl.step()
        if step == 4:
            state = ctl.state_dict()
    assert [step for step, on in enumerate(armed, 1) if on] == ([3, 5, 7] if augment else [3])
    fresh = _first_layer_model()[0]
    resumed = OIALR(fresh, torch.optim.SGD(fresh.parameters(), lr=0.0), config)
    resumed.load_state_dict(state)              # saved after step 4: step 5 ends in an update
    assert [len(fresh[i]._forward_hooks) for i in (0, 1)] == ([1, 1] if augment else [0, 0])


def test_an_automatic_transition_records_at_every_stability_sample():
    """Under warmup_steps="auto" the transition can come at any stability sample (every 3 steps here; max_steps 6
    makes it the second): those steps record, the others do not, and the transition reads the rows."""
    model, x = _first_layer_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps="auto", cutoff=0.0, stored_budget=0.4,
                                        auto={"every": 3, "lag": 1, "min_steps": 0, "max_steps": 6}))
    armed = []
    for _ in range(6):
        model(x).sum().backward()
        armed.append(len(model[0]._forward_hooks))
        ctl.step()
    assert armed == [0, 0, 1, 0, 0, 1] and ctl.transition_step == 6
    assert ctl.lowrank_layers()["0"].rank == 4          # the rows' weighing kept the first layer whole


def test_allocation_respects_floors_and_caps():
    spectra = [torch.linspace(1, 0.1, 16)] * 2
    assert allocate_ranks(spectra, [(16, 16)] * 2, 1.0, [1, 1], [3, 16])[0] == 3              # capped
    assert allocate_ranks(spectra, [(16, 16)] * 2, 0.01, [5, 2], [16, 16]) == [5, 2]           # floors over budget


def test_update_within_the_budget_gives_every_layer_its_cut():
    """While the current ranks fit the budget (always, without augment_bases) the update's allocation is each layer's
    cut, which is why the controller allocates at updates only with growth (FSDP2 then updates layer by layer): 300
    random cases of 1-4 layers, spectra, ranks and settings, the budget between the current stored fraction and
    +10%. Ranks above the budget (after growth) are cut below the cutoff's ranks."""
    g = torch.Generator().manual_seed(0)
    pick = lambda low, high: int(torch.randint(low, high + 1, (), generator=g))             # noqa: E731
    cases = 0
    while cases < 300:
        shapes = [(pick(2, 40), pick(2, 40)) for _ in range(pick(1, 4))]
        ranks = [pick(1, min(shape) // 2) for shape in shapes]
        budget = stored_fraction(shapes, ranks) * (1 + pick(0, 10) / 100)
        if budget > 1 or budget * sum(m * n for m, n in shapes) < sum(map(stored_params, *zip(*shapes), ranks)):
            continue                        # not a state a budget allows (the transition's allocation checks both)
        cases += 1
        spectra = [torch.sort(torch.rand(r, generator=g) ** pick(1, 8), descending=True).values for r in ranks]
        config = OIALRConfig(cutoff=float(torch.rand((), generator=g)) * 0.5, min_rank=pick(1, 3),
                             max_drop_fraction=float(torch.rand((), generator=g)), stored_budget=budget)
        assert update_ranks(spectra, shapes, config) == [cut_rank(s, config) for s in spectra], (shapes, ranks)
    flat = [torch.ones(16)] * 2
    config = OIALRConfig(cutoff=0.0, stored_budget=0.5, max_drop_fraction=0.5)
    assert [cut_rank(s, config) for s in flat] == [16, 16] and update_ranks(flat, [(16, 16)] * 2, config) == [8, 8]


def test_unreachable_budget_is_a_clear_error():
    shapes = [(16, 16), (8, 32)]
    lowest = min_stored_fraction(shapes, 2)
    assert lowest == pytest.approx((2 * 34 + 2 * 42) / 512)
    with pytest.raises(ValueError, match=rf"stored_budget=0.1 cannot be met.*rank 2 \(min_rank\).*{lowest:.6g}"):
        check_budget(shapes, 0.1, 2)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"stored_budget=0.05 cannot be met.*still store 0.128906 .*raise "
                                         r"stored_budget to at least 0.129,"):
        OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), OIALRConfig(stored_budget=0.05))


def test_budget_config_is_validated():
    for bad in (0, 1.5, -0.1, "half", True):
        with pytest.raises(ValueError, match=r"stored_budget must be None or a fraction in \(0, 1\]"):
            OIALRConfig(stored_budget=bad)
    assert OIALRConfig(stored_budget=1).stored_budget == 1


@pytest.mark.parametrize("name, build, shape, n_out", MODELS, ids=[m[0] for m in MODELS])
def test_controller_meets_the_budget_at_transition_and_updates(name, build, shape, n_out):
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = OIALRConfig(warmup_steps=2, update_every=2, cutoff=0.0, stored_budget=0.4)
    ctl = OIALR(model, opt, config)
    shapes = [info.shape for info in ctl.layer_infos if info.convert]
    for step, (x, y) in enumerate(batches(shape, n_out, 7)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ctl.step()
        if ctl.phase == "low-rank":
            ranks = [ctl.lowrank_layers()[n].rank for n in ctl.targets]
            assert _within_one_step(shapes, ranks, [min(s) for s in shapes], 0.4), (step, ranks)
    summary = ctl.summary()
    assert summary["stored_budget"] == 0.4
    assert summary["stored_fraction"] == summary["cut_stored_fraction"] == pytest.approx(stored_fraction(shapes, ranks))
    assert 0.3 < summary["stored_fraction"] <= 0.4


def test_budget_caps_what_the_cutoff_keeps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cut = OIALR(model, opt, OIALRConfig(warmup_steps=0, cutoff=0.6))
    cutoff_ranks = {n: layer.rank for n, layer in cut.lowrank_layers().items()}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    both = OIALR(model, opt, OIALRConfig(warmup_steps=0, cutoff=0.6, stored_budget=1.0))
    assert {n: layer.rank for n, layer in both.lowrank_layers().items()} == cutoff_ranks      # budget not binding
    assert both.summary()["stored_fraction"] <= 1.0


def test_the_cli_settings_reach_the_config():
    cfg = build_config(overrides=["oialr.stored_budget=0.25", "oialr.augment_bases=true", "oialr.train_bases=true"])
    assert (cfg.oialr.stored_budget, cfg.oialr.augment_bases, cfg.oialr.train_bases) == (0.25, True, True)
    with pytest.raises(ConfigError, match=r"oialr.stored_budget must be None or a fraction in \(0, 1\]"):
        build_config(overrides=["oialr.stored_budget=25"])
