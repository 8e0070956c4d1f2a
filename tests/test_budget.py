"""The size budget: ranks allocated across layers (oialr.budget) and the controller that meets it."""
import pytest
import torch
from torch import nn

from oialr import OIALR, OIALRConfig
from oialr.cli.settings import ConfigError, build_config
from oialr.budget import (allocate_ranks, check_budget, marginal_cost, min_stored_fraction, stored_fraction,
                          update_ranks)
from oialr.factorize import cut_rank, stored_params
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


def test_allocation_spreads_the_error_evenly_over_layers_of_different_cost():
    """Flat spectra in a 64x16 and a 16x16 layer: each keeps the same share of its energy (r/16), although a value
    of the wide layer costs 2.4x more; ranking values by energy per stored parameter would leave the wide layer at
    rank 1 and give the narrow one 10."""
    flat = torch.ones(16)
    ranks = allocate_ranks([flat, flat], [(64, 16), (16, 16)], 0.4, [1, 1], [16, 16])
    assert ranks == [4, 4]
    assert _within_one_step([(64, 16), (16, 16)], ranks, [16, 16], 0.4)


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
