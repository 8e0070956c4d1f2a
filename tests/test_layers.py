import pytest
import torch
from torch import nn

import oialr
import oialr.layers.base as base
from oialr import LowRankConv, LowRankLinear
from oialr.convert import convert_layer


@pytest.fixture(params=base.PATHS)
def path(request):
    """Run a test once on each forward path."""
    with oialr.force_path(request.param):
        yield request.param


def _factor(model, name):
    _, layer = convert_layer(model, name, rank=None, config=_full_rank_config())
    return layer


def _full_rank_config():
    from oialr import OIALRConfig
    return OIALRConfig(cutoff=0.0, rank_fraction=1.0)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_full_rank_equivalence(path, bias):
    model = nn.Sequential(nn.Linear(12, 7, bias=bias))
    x = torch.randn(5, 3, 12)
    expected = model(x)
    layer = _factor(model, "0")
    assert isinstance(model[0], LowRankLinear) and layer.rank == 7
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.weight, layer.to_dense().weight)


def test_linear_gradients_only_for_sigma_and_bias(path):
    model = nn.Sequential(nn.Linear(10, 6))
    bias = model[0].bias
    layer = _factor(model, "0")
    assert layer.bias is bias
    x = torch.randn(4, 10)
    model(x).square().sum().backward()
    assert layer.lowrank_U.grad is None and layer.lowrank_V.grad is None
    assert not layer.lowrank_U.requires_grad and not layer.lowrank_V.requires_grad
    # dL/dΣ = Uᵀ (dL/dW) V
    w = layer.dense_matrix().detach().requires_grad_()
    torch.nn.functional.linear(x, w, bias.detach()).square().sum().backward()
    expected = layer.lowrank_U.T @ w.grad @ layer.lowrank_V
    torch.testing.assert_close(layer.lowrank_S.grad, expected, atol=1e-4, rtol=1e-4)
    assert bias.grad is not None


def test_forward_rows_selects_output_features(path):
    model = nn.Sequential(nn.Linear(8, 9))
    layer = _factor(model, "0")
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer.forward_rows(x, slice(3, 6)), model(x)[:, 3:6])


CONVS = [
    nn.Conv2d(3, 8, 3, padding=1),
    nn.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2), bias=False),
    nn.Conv2d(4, 6, 3, padding="same"),
    nn.Conv2d(4, 6, 3, padding="valid"),
    nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(3, 8, 3, padding=2, padding_mode="circular"),
    nn.Conv1d(5, 7, 4, stride=2, padding=1),
    nn.Conv3d(2, 4, 3, padding=1),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: repr(c))
def test_conv_full_rank_equivalence(path, conv):
    model = nn.Sequential(conv)
    dims = len(conv.kernel_size)
    x = torch.randn(2, conv.in_channels, *([9] * dims))
    expected = model(x)
    layer = _factor(model, "0")
    assert isinstance(model[0], LowRankConv)
    assert layer.matrix_shape == (conv.out_channels, conv.weight[0].numel())
    out = model(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    dense = layer.to_dense()
    assert type(dense) is type(conv)
    torch.testing.assert_close(dense(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(6, 10, 3, padding=1), lambda: nn.Linear(9, 12)])
def test_truncated_paths_agree_in_values_and_gradients(monkeypatch, make):
    from oialr import OIALRConfig
    model = nn.Sequential(make())
    convert_layer(model, "0", config=OIALRConfig(cutoff=0.0, rank_fraction=0.3))
    layer = model[0]
    assert layer.rank == 3                                            # ceil(0.3 · min(m, n))
    x = torch.randn(2, 6, 7, 7) if isinstance(layer, LowRankConv) else torch.randn(4, 5, 9)
    results = {}
    for name in base.PATHS:
        monkeypatch.setattr(base, "forward_path", lambda *a, name=name: name)
        layer.lowrank_S.grad = None
        out = model(x)
        out.square().sum().backward()
        results[name] = (out.detach(), layer.lowrank_S.grad.clone())
    for name in ("merged", "dense"):
        torch.testing.assert_close(results[name][0], results["chain"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(results[name][1], results["chain"][1], atol=1e-4, rtol=1e-4)


def test_cost_model_picks_each_path_where_it_is_cheapest():
    assert base.forward_path(tokens=1024, m=512, n=512, r=64) == "chain"      # r < n / 3
    assert base.forward_path(tokens=8192, m=512, n=512, r=300) == "merged"    # n / 3 < r, r(m + n) below m·n
    assert base.forward_path(tokens=1024, m=512, n=512, r=400) == "dense"     # r(m + n) > m·n
    assert base.forward_path(tokens=1, m=512, n=512, r=400) == "chain"        # rebuilding W dominates


def test_trained_bases_take_the_merged_path_beyond_n_tokens():
    """With U, V trained the chain also forms their gradients from its wider intermediate: the merged path is the
    cheaper one from n tokens on, and a layer whose bases train picks it where frozen bases take the chain."""
    assert base.forward_path(tokens=1024, m=512, n=512, r=64, bases_train=True) == "merged"
    assert base.forward_path(tokens=256, m=512, n=512, r=64, bases_train=True) == "chain"      # tokens < n
    from oialr import OIALRConfig
    layer = convert_layer(nn.Sequential(nn.Linear(96, 96)), "0", rank=None,
                          config=OIALRConfig(cutoff=0.0, rank_fraction=0.16))[1]
    assert layer.rank == 16
    assert layer.path(1024) == "chain"
    layer.lowrank_U.requires_grad_(True)
    layer.lowrank_V.requires_grad_(True)
    assert layer.path(1024) == "merged"


def test_set_factors_keeps_parameter_objects_when_shape_is_unchanged():
    model = nn.Sequential(nn.Linear(6, 5))
    layer = _factor(model, "0")
    S = layer.lowrank_S
    assert layer.set_factors(layer.lowrank_U * 1, layer.lowrank_S * 2, layer.lowrank_V * 1) is False
    assert layer.lowrank_S is S
    assert layer.set_factors(layer.lowrank_U[:, :2], layer.lowrank_S[:2, :2], layer.lowrank_V[:, :2]) is True
    assert layer.lowrank_S is not S and layer.rank == 2 and layer.lowrank_S.requires_grad
    with pytest.raises(ValueError, match="factors must be U"):
        layer.set_factors(torch.zeros(5, 2), torch.zeros(3, 3), torch.zeros(6, 2))
    with pytest.raises(ValueError, match="matrix shape"):
        layer.set_factors(torch.zeros(4, 2), torch.zeros(2, 2), torch.zeros(6, 2))


def test_force_path_overrides_the_cost_model_and_every_path_computes_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    layer = _factor(model, "0")
    x = torch.randn(7, 12)
    chosen = layer.path(7)
    outputs = {}
    for path in base.PATHS:
        with oialr.force_path(path):
            assert layer.path(7) == path
            outputs[path] = layer(x)
        assert layer.path(7) == chosen                      # restored on leaving the block
    for path in base.PATHS:
        torch.testing.assert_close(outputs[path], outputs["dense"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="path must be one of chain, merged, dense, got 'fast'"):
        with oialr.force_path("fast"):
            pass


@pytest.mark.parametrize("make", [lambda: nn.Linear(9, 12)] + [lambda conv=conv: conv for conv in CONVS],
                         ids=["linear"] + [repr(c) for c in CONVS])
def test_with_factors_builds_the_same_layer_around_the_same_parameters(make):
    """A rank change under FSDP2 moves the factors into a fresh layer: same kind, settings and bias object."""
    module = make()
    model = nn.Sequential(module)
    layer = _factor(model, "0")
    layer.eval()
    U, S, V = layer.lowrank_U, layer.lowrank_S, layer.lowrank_V
    new = layer.with_factors(U, S, V)
    assert type(new) is type(layer) and new is not layer and not new.training
    assert new.lowrank_U is U and new.lowrank_S is S and new.lowrank_V is V and new.bias is layer.bias
    x = torch.randn(2, 9) if isinstance(module, nn.Linear) else torch.randn(2, module.in_channels,
                                                                             *([9] * len(module.kernel_size)))
    assert torch.equal(new(x), layer(x))
