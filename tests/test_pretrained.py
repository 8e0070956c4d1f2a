"""save_pretrained / from_pretrained: exact round trips of factored and compact models, refusals that leave the
model unchanged, and the torch-only safetensors reader and writer against the safetensors package."""
import json
import os

import pytest
import torch
from torch import nn

import oialr
from oialr import OIALR, OIALRConfig, compact_lowrank, from_pretrained, safetensors_file, save_pretrained
from models import MODELS, batches, mlp

CONFIG = OIALRConfig(warmup_steps=2, update_every=2, cutoff=0.3)
SMALL = OIALRConfig(warmup_steps=2, update_every=2, cutoff=0.3, rank_fraction=0.25)     # ranks a compact export cuts


def trained(build, shape, n_out, config=CONFIG, steps=7):
    """A model trained through the transition and two basis updates (ranks cut), in eval mode."""
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = OIALR(model, opt, config)
    for x, y in batches(shape, n_out, steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ctl.step()
    return model.eval(), ctl


def fresh(build):
    torch.manual_seed(123)                                 # other initial values than the saved model's
    return build().eval()


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize("name, build, shape, n_out", MODELS, ids=[m[0] for m in MODELS])
def test_factored_round_trip_gives_identical_logits(tmp_path, name, build, shape, n_out):
    model, ctl = trained(build, shape, n_out)
    assert ctl.phase == "low-rank"
    save_pretrained(model, str(tmp_path), CONFIG)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "oialr_config.json"]
    info = json.loads((tmp_path / "oialr_config.json").read_text())
    ranks = {n: layer.rank for n, layer in ctl.lowrank_layers().items()}
    assert {e["name"]: e["rank"] for e in info["layers"]} == ranks and info["config"] == CONFIG.to_dict()
    assert all(e["form"] == "factored" for e in info["layers"])
    loaded = from_pretrained(fresh(build), str(tmp_path))
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if n.endswith(("lowrank_U", "lowrank_V")))


@pytest.mark.parametrize("name, build, shape, n_out", MODELS, ids=[m[0] for m in MODELS])
def test_compact_export_round_trip_gives_identical_logits(tmp_path, name, build, shape, n_out):
    model = compact_lowrank(trained(build, shape, n_out, SMALL)[0])
    save_pretrained(model, str(tmp_path))
    info = json.loads((tmp_path / "oialr_config.json").read_text())
    compact = [e for e in info["layers"] if e["form"] == "compact"]
    assert info["config"] is None and len(compact) == len(info["layers"])
    assert len(compact) == {"mlp": 2, "cnn": 2, "transformer": 0, "cross_attention": 1}[name]   # transformer
    # layers read their children's weights: compact_lowrank merges them to dense
    loaded = from_pretrained(fresh(build), str(tmp_path))
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for entry in compact:
        assert isinstance(loaded.get_submodule(entry["name"]), nn.Sequential)


def test_mlp_compact_structure_is_recorded(tmp_path):
    model = compact_lowrank(trained(mlp, (8, 16), 4, SMALL)[0])
    save_pretrained(model, str(tmp_path))
    rank = model[0][0].weight.shape[0]
    assert json.loads((tmp_path / "oialr_config.json").read_text())["layers"][0] == {
        "name": "0", "form": "compact", "kind": "linear", "matrix_shape": [32, 16], "rank": rank}


def narrow_mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 20), nn.ReLU(), nn.Linear(20, 4))


def mlp_without_output_bias():
    model = mlp()
    model[4] = nn.Linear(24, 4, bias=False)
    return model


def conv_instead():
    return nn.Sequential(nn.Conv1d(16, 32, 1), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


@pytest.mark.parametrize("build, message", [
    (narrow_mlp, "layer '2': saved as a factored linear layer 24x32 of rank .*, but the model holds a linear layer "
                 "20x32; build the model with the saved architecture"),
    (conv_instead, "layer '0': saved as a factored linear layer 32x16 of rank .*, but the model holds a conv layer "
                   "32x16"),
    (lambda: nn.Sequential(nn.Linear(16, 32)), "layer '2': saved as a factored linear layer 24x32 .*, but the model "
                                               "has no linear layer of that name \\(found nothing\\)"),
    (mlp_without_output_bias, "model.safetensors: layer '4': the file has '4.bias' \\(float32 \\(4,\\)\\), the model "
                              "does not"),
])
def test_mismatched_model_is_refused_and_left_unchanged(tmp_path, build, message):
    save_pretrained(trained(mlp, (8, 16), 4)[0], str(tmp_path))
    model = fresh(build)
    before, types = state_copy(model)
    with pytest.raises(ValueError, match=message):
        from_pretrained(model, str(tmp_path))
    after, types_after = state_copy(model)
    assert types_after == types and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_missing_key_and_dtype_are_refused(tmp_path):
    save_pretrained(trained(mlp, (8, 16), 4)[0], str(tmp_path))
    model = fresh(mlp)
    model[4].register_buffer("scale", torch.ones(4))
    with pytest.raises(ValueError, match="layer '4': the model has '4.scale' \\(float32 \\(4,\\)\\), the file does "
                                         "not"):
        from_pretrained(model, str(tmp_path))
    assert isinstance(model[0], nn.Linear)
    with pytest.raises(ValueError, match="'4.weight' is float64 \\(4, 24\\) in the model, float32 \\(4, 24\\) in the "
                                         "file"):
        from_pretrained(fresh(mlp).double(), str(tmp_path))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t):
        return self.out(torch.relu(self.fc(self.emb(t))))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), OIALRConfig(warmup_steps=0, cutoff=0.5))
    save_pretrained(model, str(tmp_path))
    assert json.loads((tmp_path / "oialr_config.json").read_text())["aliases"] == {"out.weight": "emb.weight"}
    entries, _, _ = safetensors_file.read_header(str(tmp_path / "model.safetensors"))
    assert "out.weight" not in entries and "emb.weight" in entries
    loaded = from_pretrained(Tied(), str(tmp_path))
    t = torch.randint(0, 10, (3, 5))
    assert torch.equal(loaded(t), model(t)) and loaded.out.weight is loaded.emb.weight


def test_not_a_pretrained_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="oialr_config.json not found: from_pretrained reads a folder written "
                                                "by oialr.save_pretrained"):
        from_pretrained(mlp(), str(tmp_path))


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{str(d).removeprefix('torch.')}": (torch.randn(3, 5, generator=g) * 50).to(d) for d in DTYPES}
    tensors["transposed"] = torch.randn(4, 6, generator=g).mT                  # not contiguous
    tensors["empty"] = torch.zeros(0, 3)
    tensors["scalar"] = torch.tensor(2.5)
    return tensors


def test_safetensors_package_reads_what_we_write(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import safetensors
    tensors = sample_tensors()
    path = str(tmp_path / "ours.safetensors")
    safetensors_file.save_file(tensors, path, metadata={"format": "pt"})
    theirs = safetensors_torch.load_file(path)
    assert theirs.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert theirs[key].dtype == tensor.dtype and torch.equal(theirs[key], tensor), key
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_we_read_what_the_safetensors_package_writes(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    path = str(tmp_path / "theirs.safetensors")
    safetensors_torch.save_file(tensors, path, metadata={"note": "x"})
    ours = safetensors_file.load_file(path)
    assert ours.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    assert safetensors_file.read_header(path)[1] == {"note": "x"}


def test_malformed_file_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length 1000 exceeds the file size 10"):
        safetensors_file.load_file(str(path))
    with pytest.raises(ValueError, match="dtype torch.complex64, which this writer does not store"):
        safetensors_file.save_file({"c": torch.zeros(2, dtype=torch.complex64)}, str(path))


def test_public_names():
    assert {"save_pretrained", "from_pretrained"} <= set(oialr.__all__)
