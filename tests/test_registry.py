"""The layer-type registry: a new type taught to OIALR, and the rows of parameters OIALR leaves dense."""
import pytest
import torch
from torch import nn

import oialr
from oialr import OIALR, OIALRConfig, find_layers, layer_types
from oialr.layers import LowRankLinear

FULL = dict(cutoff=0.0, keep_output_layer_dense=False)


class TransposedLinear(nn.Module):
    """``y = x Wt + b`` with the weight stored transposed, ``Wt (in×out)`` (as transformers' Conv1D)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class LowRankTransposedLinear(LowRankLinear):
    def to_dense(self):
        layer = TransposedLinear(self.in_features, self.out_features)
        layer.weight = nn.Parameter(self.dense_matrix().detach().mT.contiguous())
        layer.bias = self.bias
        return layer


TRANSPOSED = oialr.LayerType("transposed", TransposedLinear, LowRankTransposedLinear,
                             lambda module, factors: LowRankTransposedLinear(*factors, bias=module.bias),
                             matrix=lambda weight: weight.mT)


@pytest.fixture
def registry(monkeypatch):
    """A private registry of the built-in types only (whatever other tests registered), so a test's registrations
    do not leak."""
    monkeypatch.setattr(layer_types, "_REGISTRY", {kind: t for kind, t in layer_types._REGISTRY.items()
                                                   if kind in ("linear", "conv")})


def model():
    return nn.Sequential(TransposedLinear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), TransposedLinear(12, 5))


def test_unregistered_type_is_listed_and_the_error_says_how_to_register(registry):
    net = nn.Sequential(TransposedLinear(6, 12), nn.ReLU(), TransposedLinear(12, 5))
    rows = {i.name: i for i in find_layers(net, OIALRConfig())}
    assert rows["0"].kind == "other" and rows["0"].shape is None and rows["0"].params == 6 * 12 + 12
    assert rows["0"].reason == ("TransposedLinear (test_registry.TransposedLinear) is not a layer type OIALR knows; "
                                "teach oialr this type with oialr.register_layer_type")
    with pytest.raises(ValueError, match=r"(?s)no layer of the model can be converted.*Parameter-holding layer types "
                       r"OIALR does not know: test_registry.TransposedLinear \(teach oialr this type with "
                       r"oialr.register_layer_type\)"):
        OIALR(net, torch.optim.SGD(net.parameters(), lr=0.1), OIALRConfig())


def test_registered_type_converts_trains_and_merges_back(registry):
    oialr.register_layer_type(TRANSPOSED)
    oialr.register_layer_type(TRANSPOSED)                 # idempotent
    net = model()
    rows = {i.name: i for i in find_layers(net, OIALRConfig(**FULL))}
    assert (rows["0"].kind, rows["0"].shape, rows["0"].convert) == ("transposed", (12, 6), True)
    x = torch.randn(7, 6)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    torch.nn.functional.mse_loss(net(x), torch.zeros(7, 5)).backward()
    opt.step()
    buffer = opt.state[net[0].weight]["momentum_buffer"].clone()       # (in, out), like the weight
    dense_out = net(x)
    ctl = OIALR(net, opt, OIALRConfig(warmup_steps=0, **FULL))
    layer = net[0]
    assert isinstance(layer, LowRankTransposedLinear) and layer.rank == 6
    torch.testing.assert_close(net(x), dense_out, atol=1e-5, rtol=1e-5)
    U, V = layer.lowrank_U.double(), layer.lowrank_V.double()
    torch.testing.assert_close(opt.state[layer.lowrank_S]["momentum_buffer"].double(), U.mT @ buffer.mT.double() @ V,
                               atol=1e-6, rtol=1e-6)         # the buffer seen as W (out×in), projected
    assert "transposed  12x6" in ctl.table()
    oialr.merge_lowrank(net)
    assert type(net[0]) is TransposedLinear and net[0].weight.shape == (6, 12)
    torch.testing.assert_close(net(x), dense_out, atol=1e-5, rtol=1e-5)


def test_registry_refuses_a_conflicting_or_reserved_kind(registry):
    oialr.register_layer_type(TRANSPOSED)
    other = oialr.LayerType("transposed", nn.Bilinear, LowRankLinear, lambda module, factors: None)
    with pytest.raises(ValueError, match="layer type 'transposed' is already registered"):
        oialr.register_layer_type(other)
    with pytest.raises(ValueError, match="kind must be an identifier other than attention, other, compact"):
        oialr.LayerType("other", TransposedLinear, LowRankLinear, lambda module, factors: None)
    with pytest.raises(TypeError, match="factored must be a subclass of oialr.LowRankLayer"):
        oialr.LayerType("t2", TransposedLinear, nn.Linear, lambda module, factors: None)
    assert list(oialr.registered_layer_types()) == ["linear", "conv", "transposed"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3, 4))         # held by a container itself
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x * self.scale.sum(0))


def test_every_parameter_holding_module_is_listed_with_its_count_and_reason():
    net = nn.ModuleDict({"emb": nn.Embedding(10, 4), "rnn": nn.LSTM(4, 4), "norm": nn.LayerNorm(4),
                         "grouped": nn.Conv1d(4, 4, 3, groups=2), "block": Block(), "fc": nn.Linear(4, 4),
                         "out": nn.Linear(4, 2)})
    rows = {i.name: i for i in find_layers(net, OIALRConfig())}
    assert [n for n in rows] == ["emb", "rnn", "norm", "grouped", "block", "block.fc", "fc", "out"]
    assert (rows["emb"].kind, rows["emb"].params) == ("other", 40)
    assert rows["emb"].reason == "Embedding: embedding (a lookup table, not a matrix product)"
    assert (rows["rnn"].params, rows["rnn"].reason) == (2 * (16 * 4 + 16), "LSTM: recurrent layer (not supported)")
    assert (rows["norm"].params, rows["norm"].reason) == (8, "LayerNorm: 1-D parameters only (norm scales and "
                                                             "shifts, biases)")
    assert rows["grouped"].kind == "conv" and rows["grouped"].reason == "grouped conv (groups=2)"
    assert (rows["block"].params, rows["block"].reason) == (12, "Block: parameters held by the module itself, not by "
                                                                "a layer")
    table = oialr.format_table(list(rows.values()))
    assert "emb       other   -      -     40            40             Embedding: embedding" in table


def test_tied_embedding_row_names_the_tie_and_summary_gives_the_dense_share():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(self.fc2(self.norm(self.fc1(self.emb(t)))))

    net = Tied()
    rows = {i.name: i for i in find_layers(net, OIALRConfig(cutoff=0.0))}
    assert rows["emb"].reason.endswith("; shares parameters with out.weight")
    assert rows["out"].reason == "weight shared with emb.weight, out.weight"
    ctl = OIALR(net, torch.optim.AdamW(net.parameters()), OIALRConfig(warmup_steps=1, cutoff=0.0))
    total = sum(p.numel() for p in net.parameters())                       # 80 + 144 + 32 + 136 (tied out once)
    assert ctl.summary()["dense_share"] == pytest.approx(1 - (16 * 8 + 8 * 16) / total)
    ctl.step()
    factored = sum(p.numel() for layer in ctl.lowrank_layers().values()
                   for p in (layer.lowrank_U, layer.lowrank_S, layer.lowrank_V))
    assert factored == 2 * 8 * (16 + 8 + 8)
    stored = sum(p.numel() for p in net.parameters())
    assert ctl.summary()["dense_share"] == pytest.approx(1 - factored / stored)
    assert "other" in ctl.table() and "emb" in ctl.table()
