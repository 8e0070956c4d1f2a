"""Trained bases (OIALRConfig(train_bases=True)): U and V train in Σ's param group, are re-orthonormalised at every
basis update, and their optimizer state is carried."""
import pytest
import torch
from torch import nn

from oialr import OIALR, OIALRConfig
from oialr.factorize import basis_update
from oialr.layers import force_path
from oialr.linalg import orthonormality_error
from models import MODELS, batches, mlp


def _step(model, opt, ctl, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    ctl.step()


def test_bases_join_sigmas_group_move_and_are_reorthonormalised():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.1},
                             {"params": [p for p in model.parameters() if p.dim() == 1], "weight_decay": 0.0}],
                            lr=3e-2)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=1, update_every=4, cutoff=0.2, train_bases=True))
    data = batches((16, 16), 4, 9, seed=1)
    _step(model, opt, ctl, *data[0])                                       # the transition
    layers = ctl.lowrank_layers()
    for layer in layers.values():
        group = opt.param_groups[0]["params"]
        i = next(i for i, p in enumerate(group) if p is layer.lowrank_S)
        assert group[i + 1] is layer.lowrank_U and group[i + 2] is layer.lowrank_V
        assert layer.lowrank_U.requires_grad and layer.lowrank_V.requires_grad
    start = {n: layer.lowrank_U.detach().clone() for n, layer in layers.items()}
    for x, y in data[1:4]:
        _step(model, opt, ctl, x, y)                                       # steps 2-4: no update yet
    for name, layer in layers.items():
        assert not torch.equal(layer.lowrank_U, start[name])               # U trained
        assert orthonormality_error(layer.lowrank_U) > 1e-4                # and drifted
    _step(model, opt, ctl, *data[4])                                       # step 5: the update
    for layer in layers.values():
        assert orthonormality_error(layer.lowrank_U) < 1e-5 and orthonormality_error(layer.lowrank_V) < 1e-5
        assert opt.state[layer.lowrank_U]["exp_avg"].shape == layer.lowrank_U.shape


def test_bases_optimizer_state_is_carried_through_the_update():
    """m_U' = m_U R_Uᵀ u_k (exact for the first moment), v_U' = v_U (T∘T), step kept; Σ's first moment follows
    the re-orthonormalisation too: m_Σ' = (R_U⁻¹ u_k)ᵀ m_Σ (R_V⁻¹ v_k)."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    config = OIALRConfig(warmup_steps=1, update_every=3, cutoff=0.3, train_bases=True)
    ctl = OIALR(model, opt, config)
    data = batches((16, 16), 4, 4, seed=1)
    for x, y in data[:3]:
        _step(model, opt, ctl, x, y)
    opt.zero_grad()
    nn.functional.cross_entropy(model(data[3][0]), data[3][1]).backward()
    opt.step()
    expected, expected_rank = {}, {}
    for name, layer in ctl.lowrank_layers().items():
        U, S, V = layer.lowrank_U, layer.lowrank_S, layer.lowrank_V
        update = basis_update(U, S, V, config)
        T_U, T_V = update.basis_maps()
        u = torch.linalg.solve_triangular(update.R_U, update.u, upper=True)[:, :update.S.shape[0]]
        v = torch.linalg.solve_triangular(update.R_V, update.v, upper=True)[:, :update.S.shape[0]]
        expected_S = u.mT @ opt.state[S]["exp_avg"].double() @ v
        expected_rank[name] = S.shape[0]
        state_U, state_V = opt.state[U], opt.state[V]
        expected[name] = [(state_U["exp_avg"].double() @ T_U, state_U["exp_avg_sq"].double() @ (T_U * T_U),
                           state_U["step"].clone()), (state_V["exp_avg"].double() @ T_V, None, None), expected_S]
    ctl.step()                                                             # step 4: the update
    truncated = False
    for name, layer in ctl.lowrank_layers().items():
        (m_U, v_U, step), (m_V, _, _), m_S = expected[name]
        truncated |= layer.rank < expected_rank[name]
        assert torch.allclose(opt.state[layer.lowrank_U]["exp_avg"].double(), m_U, atol=1e-6)
        assert torch.allclose(opt.state[layer.lowrank_U]["exp_avg_sq"].double(), v_U, atol=1e-9)
        assert torch.equal(opt.state[layer.lowrank_U]["step"], step)
        assert torch.allclose(opt.state[layer.lowrank_V]["exp_avg"].double(), m_V, atol=1e-6)
        assert torch.allclose(opt.state[layer.lowrank_S]["exp_avg"].double(), m_S, atol=1e-6)
    assert truncated, "the test needs a layer whose rank the update cuts"


@pytest.mark.parametrize("path", ["chain", "dense"])
@pytest.mark.parametrize("name, build, shape, n_out", MODELS, ids=[m[0] for m in MODELS])
def test_every_forward_path_gives_the_bases_gradients(name, build, shape, n_out, path):
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=0, cutoff=0.3, train_bases=True))
    x, y = batches(shape, n_out, 1)[0]
    with force_path(path):
        nn.functional.cross_entropy(model(x), y).backward()
    for layer_name, layer in ctl.lowrank_layers().items():
        for basis in (layer.lowrank_U, layer.lowrank_V):
            assert basis.grad is not None and basis.grad.abs().sum() > 0, layer_name


def test_train_bases_config_is_validated():
    with pytest.raises(ValueError, match="train_bases must be True or False, got 'yes'"):
        OIALRConfig(train_bases="yes")


def test_summary_counts_the_trained_bases_as_trainable():
    model = mlp()
    ctl = OIALR(model, torch.optim.AdamW(model.parameters()), OIALRConfig(warmup_steps=0, cutoff=0.0,
                                                                          rank_fraction=0.5, train_bases=True))
    summary = ctl.summary()
    for layer in summary["layers"].values():
        assert layer["trainable_params"] == layer["stored_params"] > layer["rank"] ** 2
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
