import pytest
import torch
from torch import nn

import oialr
from oialr import OIALRConfig, compact_lowrank, find_layers, merge_lowrank
from oialr.convert import convert_layer
from models import MODELS, CrossAttention, mlp, transformer


def plan(model, **kwargs):
    return {info.name: info for info in find_layers(model, OIALRConfig(**kwargs))}


def test_output_layer_rule_and_override():
    layers = plan(mlp())
    assert [n for n, i in layers.items() if i.convert] == ["0", "2"]
    assert layers["4"].reason == "output layer (keep_output_layer_dense)"
    assert all(i.convert for i in plan(mlp(), keep_output_layer_dense=False).values())


@pytest.mark.parametrize("kwargs, converted", [
    (dict(target_modules=["2"]), ["2"]),
    (dict(target_modules=r"[02]"), ["0", "2"]),
    (dict(target_modules=r"\d"), ["0", "2"]),                  # the output layer rule still applies
    (dict(exclude_modules=["0"]), ["2"]),
    (dict(exclude_modules=r"0|2"), []),
])
def test_targeting(kwargs, converted):
    assert [n for n, i in plan(mlp(), **kwargs).items() if i.convert] == converted


def test_dotted_suffix_matching_and_attention_names():
    layers = plan(transformer(), target_modules=["self_attn.in_proj", "linear1"])
    assert sorted(n for n, i in layers.items() if i.convert) == [
        "0.layers.0.linear1", "0.layers.0.self_attn.in_proj", "0.layers.1.linear1", "0.layers.1.self_attn.in_proj"]
    assert layers["0.layers.0.self_attn.in_proj"].shape == (48, 16)
    assert layers["0.layers.0.self_attn.out_proj"].reason == "not in target_modules"
    assert "0.layers.0.self_attn" not in layers
    cross = plan(CrossAttention())
    assert cross["attn.k_proj"].shape == (16, 6) and cross["attn.out_proj"].kind == "attention"


def test_dense_rules():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1), nn.Linear(100, 4), nn.Linear(4, 4),
                          nn.Linear(4, 4))
    model[1].weight.requires_grad_(False)
    layers = plan(model, max_aspect_ratio=10)
    assert layers["0"].reason == "grouped conv (groups=2)"
    assert layers["1"].reason == "frozen weight (requires_grad=False)"
    assert layers["2"].reason.startswith("aspect ratio 25.0")
    assert layers["3"].convert and layers["3"].shape == (4, 4)


def test_tied_weights_stay_dense():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.body = nn.Linear(8, 8)
            self.out = nn.Linear(8, 20, bias=False)
            self.out.weight = self.emb.weight

    layers = plan(LM(), keep_output_layer_dense=False)
    assert layers["out"].reason == "weight shared with emb.weight, out.weight"
    assert layers["body"].convert


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(6, 2))
    x = torch.randn(3, 6)
    expected = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr.OIALR(model, opt, OIALRConfig(warmup_steps=0, cutoff=0.0))
    assert model[0] is model[2] and isinstance(model[0], oialr.LowRankLinear)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_already_converted_model_is_rejected():
    model = mlp()
    convert_layer(model, "0", config=OIALRConfig())
    with pytest.raises(ValueError, match="already an OIALR layer"):
        find_layers(model, OIALRConfig())


def test_merge_lowrank_restores_dense_types_and_function():
    model = transformer().eval()
    x = torch.randn(2, 5, 16)
    oialr.OIALR(model, torch.optim.AdamW(model.parameters()), OIALRConfig(warmup_steps=0, cutoff=0.3))
    factored = model(x)
    merge_lowrank(model)
    assert not any(isinstance(m, (oialr.LowRankLayer, oialr.LowRankMultiheadAttention)) for m in model.modules())
    assert type(model[0].layers[0].self_attn) is nn.MultiheadAttention
    torch.testing.assert_close(model(x), factored, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), factored, rtol=1e-4, atol=1e-5)   # torch's fast path on merged weights


def _oialr_modules(model):
    return [m for m in model.modules() if isinstance(m, (oialr.LowRankLayer, oialr.LowRankMultiheadAttention))]


@pytest.mark.parametrize("name,build,shape,n_out", MODELS, ids=[m[0] for m in MODELS])
def test_compact_lowrank_keeps_the_function_and_stores_the_fewest_parameters(name, build, shape, n_out):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    ctl = oialr.OIALR(model, torch.optim.AdamW(model.parameters()), OIALRConfig(warmup_steps=0, rank_fraction=0.25))
    factored = model(x)
    merged = {n for n, m in model.named_modules() if isinstance(m, (oialr.LowRankMultiheadAttention,
                                                                     nn.TransformerEncoderLayer))}
    expected = sum(p.numel() for n, p in model.named_parameters() if not n.rpartition(".")[2].startswith("lowrank_"))
    for n, layer in ctl.lowrank_layers().items():
        (m, k), r = layer.matrix_shape, layer.rank
        expected += m * k if n.rpartition(".")[0] in merged else min(r * (m + k), m * k)
    compact_lowrank(model)
    assert _oialr_modules(model) == []
    assert sum(p.numel() for p in model.parameters()) == expected
    torch.testing.assert_close(model(x), factored, rtol=1e-4, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())


def test_compact_layers_two_factors_or_dense_by_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 3))
    convert_layer(model, "0", rank=8)                       # 8·(48 + 64) < 48·64: two layers
    convert_layer(model, "2", rank=25)                      # 25·(40 + 48) >= 40·48: dense
    bias = model[0].bias
    compact_lowrank(model)
    down, up = model[0]
    assert (type(down), type(up), down.weight.shape, up.weight.shape) == (nn.Linear, nn.Linear, (8, 64), (48, 8))
    assert down.bias is None and up.bias is bias           # the bias Parameter object is kept
    assert type(model[2]) is nn.Linear and model[2].weight.shape == (40, 48)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1, padding_mode="reflect"),
    nn.Conv1d(5, 12, 5, padding=4, dilation=2, bias=False),
    nn.Conv3d(4, 8, (1, 3, 3), padding=(0, 1, 1)),
], ids=["conv2d-reflect-stride", "conv1d-dilated-nobias", "conv3d"])
def test_compact_conv_is_a_conv_then_a_pointwise_conv(conv):
    torch.manual_seed(0)
    model = nn.Sequential(conv)
    x = torch.randn(2, conv.in_channels, *(7,) * len(conv.kernel_size))
    convert_layer(model, "0", rank=2)
    factored = model(x)
    compact_lowrank(model)
    down, up = model[0]
    assert type(down) is type(conv) and type(up) is type(conv)
    assert (down.kernel_size, down.stride, down.padding, down.dilation, down.padding_mode) == \
        (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    assert up.kernel_size == (1,) * len(conv.kernel_size) and (up.bias is None) == (conv.bias is None)
    torch.testing.assert_close(model(x), factored, rtol=1e-4, atol=1e-5)


def test_convert_layer_rank_errors():
    model = mlp()
    with pytest.raises(ValueError, match=r"layer .0.: rank must be in \[1, 16\] for a \(32, 16\) weight, got 17"):
        convert_layer(model, "0", rank=17)
    with pytest.raises(ValueError, match="needs factors, a rank or a config"):
        convert_layer(model, "0")


def test_format_table_counts():
    model = mlp()
    table = oialr.format_table(find_layers(model, OIALRConfig()), {"0": 4})
    row = next(line for line in table.splitlines() if line.startswith("0 "))
    assert "4/16" in row and "512" in row and f"{4 * (32 + 16 + 4):,}" in row
