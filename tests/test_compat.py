"""Converted timm and torchvision models keep working: same function at full rank, training continues."""
import pytest
import torch
from torch import nn

import oialr
from oialr import OIALR, OIALRConfig

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def tiny_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=24, depth=2,
                             num_heads=2, qkv_bias=False)


MODELS = [
    ("timm_vit", tiny_vit, (2, 1, 16, 16)),
    ("timm_resnet18", lambda: timm.create_model("resnet18", pretrained=False, num_classes=5), (2, 3, 32, 32)),
    ("torchvision_resnet18", lambda: torchvision.models.resnet18(weights=None, num_classes=5), (2, 3, 32, 32)),
]


@pytest.mark.parametrize("name, build, shape", MODELS, ids=[m[0] for m in MODELS])
def test_full_rank_conversion_is_exact_and_trains(name, build, shape):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    expected = model(x).detach()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=0, update_every=1, cutoff=0.0))
    head = next(info for info in ctl.layer_infos if info.reason.startswith("output layer"))
    assert head.name in ("head", "fc")
    out = model(x).detach()
    assert (out - expected).norm() / expected.norm() < 1e-4
    model.train()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        opt.step()
        ctl.step()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    s = ctl.summary()
    assert s["trainable_params"] < s["dense_trainable_params"]


def test_timm_vit_layer_names():
    model = tiny_vit()
    names = {i.name: i for i in oialr.find_layers(model, OIALRConfig())}
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "head"} <= set(names)
    assert names["patch_embed.proj"].shape == (24, 16)


def test_custom_subclasses_stay_dense():
    from timm.layers import StdConv2d
    model = nn.Sequential(StdConv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 2))
    infos = {i.name: i for i in oialr.find_layers(model, OIALRConfig())}
    assert infos["0"].reason == "StdConv2d overrides forward (custom layer)"
    assert infos["1"].convert
