"""LowRankMultiheadAttention re-expresses nn.MultiheadAttention exactly, sharing its Parameter objects."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from oialr.layers.attention import LowRankMultiheadAttention
from oialr.layers.linear import LowRankLinear

E, H, N, L, S = 16, 4, 3, 5, 6


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def full_rank(linear: nn.Module) -> LowRankLinear:
    """A full-rank LowRankLinear from the SVD of ``linear.weight`` (same bias Parameter)."""
    U, s, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    r = s.numel()
    return LowRankLinear(U[:, :r].contiguous(), torch.diag(s[:r]), Vh[:r].T.contiguous(), linear.bias)


# name: (nn.MultiheadAttention kwargs, inputs, masks). inputs: self | cross (q, k, v distinct) | kv (key is value)
CASES = {
    "self": ({}, "self", {}),
    "self_batch_first": ({"batch_first": True}, "self", {}),
    "cross": ({}, "cross", {}),
    "cross_batch_first": ({"batch_first": True}, "cross", {}),
    "key_is_value": ({"batch_first": True}, "kv", {}),
    "unbatched_self": ({}, "self_unbatched", {}),
    "unbatched_cross_kpm": ({"batch_first": True}, "cross_unbatched", {"kpm": "bool"}),
    "kdim_vdim": ({"kdim": 10, "vdim": 7}, "cross", {}),
    "kdim_vdim_batch_first_masks": ({"kdim": 10, "vdim": 7, "batch_first": True}, "cross",
                                    {"attn_mask": "bool", "kpm": "bool"}),
    "no_bias": ({"bias": False}, "cross", {}),
    "no_bias_kdim": ({"bias": False, "kdim": 10, "vdim": 10}, "kv", {}),
    "bias_kv": ({"add_bias_kv": True}, "self", {"attn_mask": "float", "kpm": "float"}),
    "zero_attn": ({"add_zero_attn": True, "batch_first": True}, "cross", {"attn_mask": "bool", "kpm": "bool"}),
    "bias_kv_zero_attn": ({"add_bias_kv": True, "add_zero_attn": True}, "kv", {"attn_mask": "bool3d"}),
    "bool_mask": ({}, "self", {"attn_mask": "bool"}),
    "float_mask": ({"batch_first": True}, "cross", {"attn_mask": "float"}),
    "mask_3d": ({}, "cross", {"attn_mask": "float3d"}),
    "bool_mask_3d_kpm": ({"batch_first": True}, "self", {"attn_mask": "bool3d", "kpm": "bool"}),
    "kpm_bool": ({"batch_first": True}, "self", {"kpm": "bool"}),
    "kpm_float": ({}, "kv", {"kpm": "float"}),
    "causal": ({"batch_first": True}, "self", {"attn_mask": "causal", "is_causal": True}),
    "causal_kpm": ({}, "self", {"attn_mask": "causal", "is_causal": True, "kpm": "float"}),
    "causal_bias_kv": ({"add_bias_kv": True}, "self", {"attn_mask": "causal", "is_causal": True}),
}
WEIGHTS = {"weights_avg": (True, True), "weights_per_head": (True, False), "no_weights": (False, True)}


def make_case(name: str, seed: int = 0):
    """``(mha, query, key, value, kwargs)`` for CASES[name], all random with a fixed seed."""
    mha_kwargs, inputs, masks = CASES[name]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, **mha_kwargs)
    with torch.no_grad():                       # non-zero biases, so that a wrong bias slice shows
        for p in mha.parameters():
            if p.dim() == 1:
                p.normal_(generator=g)
    unbatched = inputs.endswith("_unbatched")
    kind = inputs.removesuffix("_unbatched")
    n = 1 if unbatched else N
    src_len = L if kind == "self" else S

    def seq(length, dim):
        x = torch.randn(n, length, dim, generator=g)
        x = x if mha.batch_first else x.transpose(0, 1).contiguous()
        return x[0] if unbatched and mha.batch_first else x[:, 0] if unbatched else x

    query = seq(L, E)
    key = query if kind == "self" else seq(S, mha.kdim)
    value = key if kind in ("self", "kv") else seq(S, mha.vdim)
    kwargs = {}
    shape3 = (n * H, L, src_len)
    allowed = torch.ones(L, src_len, dtype=torch.bool)
    allowed[:, 0] = False                       # every query row keeps one key, so no row is fully masked
    mask = masks.get("attn_mask")
    if mask == "bool":
        kwargs["attn_mask"] = (torch.rand(L, src_len, generator=g) > 0.6) & allowed
    elif mask == "bool3d":
        kwargs["attn_mask"] = (torch.rand(shape3, generator=g) > 0.6) & allowed
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(L, src_len, generator=g)
    elif mask == "float3d":
        kwargs["attn_mask"] = torch.randn(shape3, generator=g)
    elif mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
    if masks.get("kpm") is not None:
        kpm = torch.rand(n, src_len, generator=g) > 0.6
        kpm[:, 0] = False
        kpm = kpm if masks["kpm"] == "bool" else torch.randn(n, src_len, generator=g)
        kwargs["key_padding_mask"] = kpm[0] if unbatched else kpm
    if masks.get("is_causal"):
        kwargs["is_causal"] = True
    return mha.eval(), query, key, value, kwargs


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("case", CASES)
def test_matches_torch(case, weights):
    mha, q, k, v, kwargs = make_case(case)
    need_weights, average = WEIGHTS[weights]
    kwargs.update(need_weights=need_weights, average_attn_weights=average)
    ours = LowRankMultiheadAttention.from_torch(mha)
    out, w = ours(q, k, v, **kwargs)
    ref_out, ref_w = mha(q, k, v, **kwargs)
    assert out.shape == ref_out.shape
    close(out, ref_out)
    if need_weights:
        assert w.shape == ref_w.shape
        close(w, ref_w)
    else:
        assert w is None and ref_w is None


@pytest.mark.parametrize("case", ["self", "cross_batch_first", "kdim_vdim_batch_first_masks", "bias_kv_zero_attn",
                                  "unbatched_cross_kpm", "no_bias"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_same_gradients(case, need_weights):
    mha, q, k, v, kwargs = make_case(case)
    mha.train()                                  # dropout is 0: training mode, deterministic
    q.requires_grad_(True)
    ours = LowRankMultiheadAttention.from_torch(mha)
    grads = []
    for module in (mha, ours):
        mha.zero_grad(set_to_none=True)
        q.grad = None
        out, w = module(q, k, v, need_weights=need_weights, **kwargs)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        if need_weights:
            loss = loss + (w * torch.linspace(-1, 1, w.numel()).view_as(w)).sum()
        loss.backward()
        grads.append([q.grad] + [p.grad for p in mha.parameters()])
    for ref, got in zip(*grads):
        assert got is not None
        close(got, ref, atol=1e-5)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_dropout_draws_same_masks_as_torch(batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dropout=0.3, batch_first=batch_first)
    ours = LowRankMultiheadAttention.from_torch(mha)
    x = torch.randn(N, L, E)
    torch.manual_seed(1)
    ref = mha(x, x, x, need_weights=need_weights)
    torch.manual_seed(1)
    got = ours(x, x, x, need_weights=need_weights)
    close(got[0], ref[0])
    if need_weights:
        close(got[1], ref[1])
    ours.eval()                                  # no dropout in eval mode: deterministic
    close(ours(x, x, x)[0], ours(x, x, x)[0])


def test_mismatched_mask_types_warn_and_work_like_torch():
    mha, q, k, v, kwargs = make_case("bias_kv")
    kwargs["key_padding_mask"] = kwargs["key_padding_mask"] > 0          # bool padding mask, float attn_mask
    ours = LowRankMultiheadAttention.from_torch(mha)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        out, w = ours(q, k, v, **kwargs)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        ref_out, ref_w = mha(q, k, v, **kwargs)
    close(out, ref_out)
    close(w, ref_w)


def test_shares_parameter_objects():
    joint = nn.MultiheadAttention(E, H, add_bias_kv=True)
    ours = LowRankMultiheadAttention.from_torch(joint)
    assert ours.in_proj.weight is joint.in_proj_weight and ours.in_proj_weight is joint.in_proj_weight
    assert ours.in_proj.bias is joint.in_proj_bias and ours.in_proj_bias is joint.in_proj_bias
    assert ours.out_proj is joint.out_proj
    assert ours.bias_k is joint.bias_k and ours.bias_v is joint.bias_v
    assert ours.q_proj_weight is None and ours.k_proj_weight is None and ours.v_proj_weight is None
    separate = nn.MultiheadAttention(E, H, kdim=10, vdim=7)
    ours = LowRankMultiheadAttention.from_torch(separate)
    assert ours.q_proj.weight is separate.q_proj_weight and ours.q_proj.bias is None
    assert ours.k_proj.weight is separate.k_proj_weight and ours.v_proj.weight is separate.v_proj_weight
    assert ours.in_proj_bias is separate.in_proj_bias and ours.in_proj_weight is None
    assert ours.k_proj_weight is separate.k_proj_weight
    for mha in (joint, separate):
        ours = LowRankMultiheadAttention.from_torch(mha)
        assert {id(p) for p in ours.parameters()} == {id(p) for p in mha.parameters()}
        assert len(list(ours.parameters())) == len(list(mha.parameters()))
    assert not LowRankMultiheadAttention.from_torch(joint.eval()).training


def test_optimizer_on_original_parameters_trains_the_wrapper():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, kdim=10, vdim=10)
    opt = torch.optim.SGD(mha.parameters(), lr=0.1)
    ours = LowRankMultiheadAttention.from_torch(mha)
    q, kv = torch.randn(L, N, E), torch.randn(S, N, 10)
    before = ours(q, kv, kv)[0].detach()
    ours(q, kv, kv)[0].square().sum().backward()
    opt.step()
    after = ours(q, kv, kv)[0].detach()
    assert not torch.allclose(before, after)
    close(after, mha(q, kv, kv)[0].detach())


def test_constructor_matches_torch_initialisation():
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(E, H, add_bias_kv=True, kdim=10, vdim=7, batch_first=True)
    torch.manual_seed(3)
    ours = LowRankMultiheadAttention(E, H, add_bias_kv=True, kdim=10, vdim=7, batch_first=True)
    q, k, v = torch.randn(N, L, E), torch.randn(N, S, 10), torch.randn(N, S, 7)
    close(ours(q, k, v)[0], ref(q, k, v)[0])


def test_cross_attention_projects_only_needed_rows():
    """Self-attention calls in_proj once; cross-attention projects through row slices, never the full 3E."""
    mha = nn.MultiheadAttention(E, H).eval()
    ours = LowRankMultiheadAttention.from_torch(mha)
    calls = []
    ours.in_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape[-1]))
    x, mem = torch.randn(L, N, E), torch.randn(S, N, E)
    ours(x, x, x)
    assert calls == [3 * E]
    ours(x, mem, mem)
    ours(x, mem, mem.clone())
    assert calls == [3 * E]


def _swap_full_rank(ours: LowRankMultiheadAttention) -> None:
    names = ["in_proj"] if ours._qkv_same_embed_dim else ["q_proj", "k_proj", "v_proj"]
    for name in names + ["out_proj"]:
        setattr(ours, name, full_rank(getattr(ours, name)))


@pytest.mark.parametrize("case", ["self_batch_first", "cross", "key_is_value", "kdim_vdim_batch_first_masks",
                                  "bias_kv_zero_attn", "unbatched_cross_kpm"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_full_rank_lowrank_projections_match(case, need_weights):
    mha, q, k, v, kwargs = make_case(case)
    ref_out, ref_w = mha(q, k, v, need_weights=need_weights, **kwargs)
    ours = LowRankMultiheadAttention.from_torch(mha)
    _swap_full_rank(ours)
    assert ours.in_proj_bias is mha.in_proj_bias
    out, w = ours(q, k, v, need_weights=need_weights, **kwargs)
    close(out, ref_out, atol=1e-5)
    if need_weights:
        close(w, ref_w, atol=1e-5)


@pytest.mark.parametrize("case", ["self", "cross_batch_first", "kdim_vdim_batch_first_masks", "bias_kv_zero_attn",
                                  "no_bias"])
@pytest.mark.parametrize("lowrank", [False, True])
def test_to_torch_round_trip(case, lowrank):
    mha, q, k, v, kwargs = make_case(case)
    ref_out, ref_w = mha(q, k, v, **kwargs)
    ours = LowRankMultiheadAttention.from_torch(mha)
    if lowrank:
        _swap_full_rank(ours)
    back = ours.to_torch()
    assert type(back) is nn.MultiheadAttention and not back.training
    assert back.in_proj_bias is mha.in_proj_bias and back.bias_k is mha.bias_k and back.bias_v is mha.bias_v
    assert (back.out_proj is mha.out_proj) != lowrank
    assert isinstance(back.out_proj, nn.Linear)
    if not lowrank:
        assert {id(p) for p in back.parameters()} == {id(p) for p in mha.parameters()}
    out, w = back(q, k, v, **kwargs)
    close(out, ref_out, atol=1e-5)
    close(w, ref_w, atol=1e-5)


def test_errors():
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    ours = LowRankMultiheadAttention.from_torch(mha)
    x = torch.randn(N, L, E)
    with pytest.raises(RuntimeError, match="is_causal"):   # as torch (outside its inference fast path)
        ours(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="is_causal"):
        mha(x, x, x, is_causal=True)
    bad = [
        ((torch.randn(L, E, 1, 1), x, x), {}, "2-D"),
        ((x, torch.randn(L, E), x), {}, "3-D like query"),
        ((torch.randn(N, L, E + 1),) * 3, {}, "features"),
        ((x, torch.randn(N, S, E), torch.randn(N, S + 1, E)), {}, "same sequence"),
        ((x, torch.randn(N + 1, S, E), torch.randn(N + 1, S, E)), {}, "batch size"),
        ((x, x, x), {"attn_mask": torch.zeros(L, L + 1, dtype=torch.bool)}, "attn_mask must have shape"),
        ((x, x, x), {"attn_mask": torch.zeros(H, L, L)}, "attn_mask must have shape"),
        ((x, x, x), {"key_padding_mask": torch.zeros(N, L + 1, dtype=torch.bool)}, "key_padding_mask must have"),
        ((x, x, x), {"key_padding_mask": torch.zeros(L, dtype=torch.bool)}, "2-D"),
        ((x, x, x), {"attn_mask": torch.zeros(L, L, dtype=torch.int64)}, "bool or floating"),
    ]
    for args, kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            ours(*args, **kwargs)


# --- inside torch's Transformer modules (they read self_attn's attributes; eval + no_grad takes a fused path)

def _run(model, *args, **kwargs):
    model.train()
    train_out = model(*args, **kwargs)
    model.eval()
    with torch.no_grad():
        eval_out = model(*args, **kwargs)
    return train_out.detach(), eval_out


def _count_forward_calls(monkeypatch) -> list:
    calls = []
    forward = LowRankMultiheadAttention.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LowRankMultiheadAttention, "forward", counting)
    return calls


@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("lowrank", [False, True])
def test_transformer_encoder_layer(batch_first, norm_first, lowrank, monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                       batch_first=batch_first, norm_first=norm_first)
    x = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    ref = _run(layer, x, src_key_padding_mask=kpm)
    layer.self_attn = LowRankMultiheadAttention.from_torch(layer.self_attn)
    if lowrank:
        _swap_full_rank(layer.self_attn)
    calls = _count_forward_calls(monkeypatch)
    got = _run(layer, x, src_key_padding_mask=kpm)
    # train mode runs our forward; eval + no_grad with batch_first takes torch's fused kernel, fed our weights
    assert len(calls) == (1 if batch_first else 2)
    for a, b in zip(got, ref):
        close(a, b, atol=1e-5)


def test_transformer_decoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mem_kpm = torch.zeros(2, 7, dtype=torch.bool)
    mem_kpm[0, 4:] = True
    kwargs = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(5), "tgt_is_causal": True,
              "memory_key_padding_mask": mem_kpm}
    ref = _run(layer, tgt, memory, **kwargs)
    layer.self_attn = LowRankMultiheadAttention.from_torch(layer.self_attn)
    layer.multihead_attn = LowRankMultiheadAttention.from_torch(layer.multihead_attn)
    for a, b in zip(_run(layer, tgt, memory, **kwargs), ref):
        close(a, b, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_transformer_encoder_with_padding(monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2)
    x = torch.randn(3, 6, 32)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, 4:] = True                            # left aligned: eval + no_grad runs on nested tensors
    kpm[2, 2:] = True
    ref = _run(encoder, x, src_key_padding_mask=kpm)
    for enc_layer in encoder.layers:
        enc_layer.self_attn = LowRankMultiheadAttention.from_torch(enc_layer.self_attn)
    calls = _count_forward_calls(monkeypatch)
    got = _run(encoder, x, src_key_padding_mask=kpm)
    assert len(calls) == 2                       # the two layers in train mode; none in the fused eval path
    for a, b in zip(got, ref):
        close(a, b, atol=1e-5)
