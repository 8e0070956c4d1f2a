"""The peer methods of oialr.baselines: factorized (two factors from step 0), svd-finetune (full-rank, then two
factors) and GaLore's projected AdamW, each checked against what it promises."""
import io
import json

import pytest
import torch
from torch import nn

from oialr import OIALRConfig
from oialr.baselines import FactorizedTraining, factorize_linear, resolve_ranks
from oialr.baselines.ranks import linear_layers


def mlp():
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))


def test_factorize_linear_at_full_rank_is_the_layer():
    layer = nn.Linear(12, 20)
    two = factorize_linear(layer, 12)
    x = torch.randn(7, 12)
    torch.testing.assert_close(two(x), layer(x), rtol=1e-5, atol=1e-5)
    down, up = two
    assert down.weight.shape == (12, 12) and up.weight.shape == (20, 12) and down.bias is None
    assert up.bias is layer.bias
    torch.testing.assert_close(down.weight.norm(), up.weight.norm(), rtol=1e-5, atol=0)   # balanced: √s on each side
    assert factorize_linear(layer, 3)[0].weight.shape == (3, 12)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 12\]"):
        factorize_linear(layer, 13)


def test_factorized_at_full_rank_equals_dense_at_step_0():
    torch.manual_seed(0)
    dense = mlp()
    model = mlp()
    model.load_state_dict(dense.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = FactorizedTraining(model, opt, OIALRConfig(), rank=1.0, start_step=0)
    x = torch.randn(9, 12)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    assert ctl.phase == "low-rank" and ctl.transition_step == 0
    assert isinstance(model[0], nn.Sequential) and isinstance(model[2], nn.Sequential)
    assert type(model[4]) is nn.Linear                              # the output layer stays dense
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}            # the factors train, the old weights are gone
    summary = ctl.summary()
    assert summary["layers"]["0"] == {"rank": 12, "full_rank": 12, "shape": [20, 12], "dense_params": 240,
                                      "trainable_params": 12 * 32, "stored_params": 12 * 32}


def test_ranks_from_a_fraction_a_number_or_a_results_file(tmp_path):
    layers = {"a": (20, 12), "b": (16, 20)}
    assert resolve_ranks(0.25, layers) == {"a": 3, "b": 4}
    assert resolve_ranks(14, layers) == {"a": 12, "b": 14}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"layers": {"a": {"rank": 5}, "b": {"rank": 7}, "c": {"rank": 1}}}))
    assert resolve_ranks(str(path), layers) == {"a": 5, "b": 7}
    path.write_text(json.dumps({"layers": {"a": {"rank": 5}}}))
    with pytest.raises(ValueError, match=r"no rank for 1 layer\(s\) of this model \(b\)"):
        resolve_ranks(str(path), layers)
    with pytest.raises(ValueError, match="cannot read"):
        resolve_ranks(str(tmp_path / "none.json"), layers)
    for bad in (0, 1.5, True, ""):
        with pytest.raises(ValueError, match="rank must be a fraction"):
            resolve_ranks(bad, layers)


def test_peers_treat_only_plain_linear_layers():
    with pytest.raises(ValueError, match="no plain nn.Linear"):
        linear_layers(nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(8, 2)), OIALRConfig())
    attention = nn.Sequential(nn.Linear(4, 4))
    assert linear_layers(attention, OIALRConfig(keep_output_layer_dense=False)) == {"0": (4, 4)}


def test_svd_finetune_truncates_at_its_step_keeping_outputs_at_full_rank(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = FactorizedTraining(model, opt, OIALRConfig(), rank=1.0, start_step=3)
    x = torch.randn(9, 12)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        before = model(x).detach()
        old = model[0].weight
        ctl.step()
    assert ctl.phase == "low-rank" and ctl.transition_step == 3 and old not in opt.state
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)      # right after the truncation: unchanged

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"layers": {"0": {"rank": 2}, "2": {"rank": 5}}}))
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = FactorizedTraining(model, opt, OIALRConfig(), rank=str(path), start_step=1)
    ctl.step()
    assert model[0][0].weight.shape == (2, 12) and model[2][0].weight.shape == (5, 20)   # the ranks asked for
    assert {n: layer["rank"] for n, layer in ctl.summary()["layers"].items()} == {"0": 2, "2": 5}


def test_svd_finetune_state_dict_rebuilds_the_factors_for_exact_resume():
    def build():
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, FactorizedTraining(model, opt, OIALRConfig(), rank=0.5, start_step=2)

    x = torch.randn(9, 12)

    def train(model, opt, ctl, steps):
        return _train(model, opt, x, steps, ctl)

    straight = train(*build(), 6)
    model, opt, ctl = build()
    first = train(model, opt, ctl, 4)
    saved = _round_trip({"ctl": ctl.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()})
    model, opt, ctl = build()
    ctl.load_state_dict(saved["ctl"])
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    assert first + train(model, opt, ctl, 2) == straight
    changed = dict(saved["ctl"], ranks={"0": 1, "2": 1})
    with pytest.raises(ValueError, match="other ranks"):
        build()[2].load_state_dict(changed)


def _train(model, opt, x, steps, ctl=None):
    """``steps`` optimizer steps on the loss ``mean(model(x)²)`` (and ``ctl.step()`` after each); the losses."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        if ctl is not None:
            ctl.step()
        losses.append(loss.item())
    return losses


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_galore_projects_the_eligible_weights_and_resumes_exactly():
    pytest.importorskip("galore_torch")
    from oialr.baselines.galore import galore_adamw

    def build():
        torch.manual_seed(0)
        model = mlp()
        ranks = resolve_ranks(0.25, linear_layers(model, OIALRConfig()))
        return model, galore_adamw(model, ranks, lr=1e-2, weight_decay=0.01, update_proj_gap=3, scale=0.25,
                                   proj_type="std")

    x = torch.randn(9, 12)

    def train(model, opt, steps):
        return _train(model, opt, x, steps)

    straight = train(*build(), 7)
    model, opt = build()
    assert [g.get("rank") for g in opt.param_groups] == [None, 3, 4]       # ceil(0.25 · 12), ceil(0.25 · 16)
    first = train(model, opt, 4)                                            # the projector was renewed at step 3
    assert opt.state[model[0].weight]["exp_avg"].shape == (20, 3)          # Adam's moments on G Qᵀ (m×r)
    saved = _round_trip({"model": model.state_dict(), "opt": opt.state_dict()})   # weights_only=True loads it
    assert "projector" in opt.state[model[0].weight]                        # the live state is untouched
    model, opt = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    assert first + train(model, opt, 3) == straight
