"""GPT-2 (transformers' Conv1D layers) converts, trains and round-trips once oialr.integrations.hf_conv1d is
registered."""
import pytest
import torch

import oialr
from oialr import OIALR, OIALRConfig, layer_types

transformers = pytest.importorskip("transformers")
hf_conv1d = pytest.importorskip("oialr.integrations.hf_conv1d")


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(layer_types, "_REGISTRY", {kind: t for kind, t in layer_types._REGISTRY.items()
                                                   if kind != "hf_conv1d"})     # as before any register()
    hf_conv1d.register()
    hf_conv1d.register()                                   # idempotent


def gpt2():
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_without_registration_names_the_conv1d_layers(monkeypatch):
    monkeypatch.setattr(layer_types, "_REGISTRY", {kind: t for kind, t in layer_types._REGISTRY.items()
                                                   if kind != "hf_conv1d"})     # as before any register()
    model = gpt2()
    with pytest.raises(ValueError, match=r"(?s)transformer.h.0.attn.c_attn \(other\): Conv1D .*Parameter-holding "
                       r"layer types OIALR does not know: transformers.pytorch_utils.Conv1D \(register it with "
                       r"oialr.integrations.hf_conv1d.register\(\)\)"):
        OIALR(model, torch.optim.AdamW(model.parameters()), OIALRConfig())


def test_gpt2_converts_trains_and_keeps_the_tied_head_dense(registered):
    model = gpt2()
    tokens = torch.randint(0, 100, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=3, update_every=2, cutoff=0.0))
    rows = {i.name: i for i in ctl.layer_infos}
    assert (rows["transformer.h.0.attn.c_attn"].kind, rows["transformer.h.0.attn.c_attn"].shape) == ("hf_conv1d",
                                                                                                     (192, 64))
    assert rows["lm_head"].reason == "weight shared with lm_head.weight, transformer.wte.weight"
    assert rows["transformer.wte"].reason.endswith("shares parameters with lm_head.weight")
    assert len(ctl.targets) == 8
    losses = []
    for step in range(6):
        model.train()
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            dense = model(tokens).logits
        ctl.step()
        if step == 2:                                      # the transition: same function, factored
            assert ctl.phase == "low-rank"
            with torch.no_grad():
                torch.testing.assert_close(model(tokens).logits, dense, atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, hf_conv1d.LowRankConv1D) and layer.weight.shape == (64, 192)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head                      linear     100x64" in ctl.table()
    with torch.no_grad():
        factored = model(tokens).logits
        merged = oialr.merge_lowrank(model)
        assert type(merged.transformer.h[0].attn.c_attn) is transformers.pytorch_utils.Conv1D
        torch.testing.assert_close(merged(tokens).logits, factored, atol=1e-5, rtol=1e-5)


def test_gpt2_save_pretrained_round_trip_is_exact(registered, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = gpt2()
    tokens = torch.randint(0, 100, (2, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=1, update_every=1, cutoff=0.2, rank_fraction=0.25))
    for _ in range(3):
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step()
    oialr.save_pretrained(model, str(tmp_path), ctl.config)
    torch.manual_seed(1)
    loaded = oialr.from_pretrained(gpt2(), str(tmp_path))
    assert isinstance(loaded.transformer.h[1].mlp.c_proj, hf_conv1d.LowRankConv1D)
    assert loaded.transformer.h[1].mlp.c_proj.rank == model.transformer.h[1].mlp.c_proj.rank
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model.eval()(tokens).logits)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    monkeypatch.setattr(layer_types, "_REGISTRY", {k: v for k, v in layer_types._REGISTRY.items() if k != "hf_conv1d"})
    with pytest.raises(ValueError, match=r"layer 'transformer.h.0.attn.c_attn': saved as a factored hf_conv1d layer "
                       r"192x64 of rank \d+, but layer type 'hf_conv1d' is not registered .*"
                       r"oialr.integrations.hf_conv1d.register\(\)"):
        oialr.from_pretrained(gpt2(), str(tmp_path))
    monkeypatch.setattr(layer_types, "_REGISTRY", {**layer_types._REGISTRY, "hf_conv1d": hf_conv1d.CONV1D})
    compact = oialr.compact_lowrank(model)
    assert isinstance(compact.transformer.h[0].mlp.c_fc, torch.nn.Sequential)      # two Linear layers
    oialr.save_pretrained(compact, str(tmp_path / "compact"))
    torch.manual_seed(2)
    reloaded = oialr.from_pretrained(gpt2(), str(tmp_path / "compact"))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, compact(tokens).logits)


def test_with_factors_keeps_the_conv1d_kind(registered):
    model = gpt2()
    OIALR(model, torch.optim.AdamW(model.parameters()), OIALRConfig(warmup_steps=0))
    layer = model.transformer.h[0].attn.c_attn
    new = layer.with_factors(layer.lowrank_U, layer.lowrank_S, layer.lowrank_V)
    assert type(new) is hf_conv1d.LowRankConv1D and new.bias is layer.bias and new.lowrank_S is layer.lowrank_S
    x = torch.randn(2, 5, 64)
    assert torch.equal(new(x), layer(x))
