import socket

import pytest
import torch
from torch import nn

from oialr.cli.models import MODEL_NAMES, build_model

SIGNAL, IMAGE = (1, 40), (1, 28, 28)          # MNIST-1D, Fashion-MNIST

# (model, input shape, parameter count, head name). Counts with 10 classes and default options:
#   mlp       78,858 (MNIST-1D)     269,322 (Fashion-MNIST)
#   cnn      135,274 (MNIST-1D)     241,898 (Fashion-MNIST)
#   vit            -              2,681,098 (Fashion-MNIST)
#   resnet18       -             11,172,810 (Fashion-MNIST)
CASES = [
    ("mlp", SIGNAL, 78_858, "5"), ("mlp", IMAGE, 269_322, "5"),
    ("cnn", SIGNAL, 135_274, "head"), ("cnn", IMAGE, 241_898, "head"),
    ("vit", IMAGE, 2_681_098, "head"), ("resnet18", IMAGE, 11_172_810, "fc"),
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Building a model must never download anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name, shape, params, head", CASES, ids=[f"{c[0]}-{len(c[1]) - 1}d" for c in CASES])
def test_builds_forward_and_head_is_last_eligible_layer(name, shape, params, head):
    model = build_model(name, shape, 10)
    assert sum(p.numel() for p in model.parameters()) == params
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    eligible = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    assert eligible[-1] == head
    last = model.get_submodule(head)
    assert isinstance(last, nn.Linear) and last.out_features == 10


def test_cnn_uses_1d_and_2d_convolutions():
    assert any(isinstance(m, nn.Conv1d) for m in build_model("cnn", SIGNAL, 10).modules())
    assert any(isinstance(m, nn.Conv2d) for m in build_model("cnn", IMAGE, 10).modules())


def test_resnet18_stem_keeps_resolution():
    model = build_model("resnet18", IMAGE, 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.Identity)
    assert model.forward_features(torch.randn(1, *IMAGE)).shape == (1, 512, 4, 4)
    imagenet = build_model("resnet18", IMAGE, 10, small_stem=False)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    assert imagenet.eval().forward_features(torch.randn(1, *IMAGE)).shape == (1, 512, 1, 1)
    with pytest.raises(ValueError, match="small_stem must be true or false, got 'no'"):
        build_model("resnet18", IMAGE, 10, small_stem="no")


@pytest.mark.parametrize("name", ["vit", "resnet18"])
def test_image_models_refuse_signals(name):
    with pytest.raises(ValueError, match=rf"{name} needs images \(C, H, W\), got input_shape \(1, 40\)"):
        build_model(name, SIGNAL, 10)


def test_options_and_errors():
    vit = build_model("vit", IMAGE, 5, embed_dim=32, depth=2, num_heads=2, patch_size=4)
    assert len(vit.blocks) == 2 and vit.patch_embed.num_patches == 49 and vit.blocks[0].attn.qkv.bias is None
    assert vit(torch.randn(2, *IMAGE)).shape == (2, 5)
    assert build_model("mlp", SIGNAL, 3, width=16)[1].out_features == 16
    assert build_model("cnn", SIGNAL, 3, channels=(8, 16))(torch.randn(2, *SIGNAL)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown model 'lenet'; choose one of: " + ", ".join(MODEL_NAMES)):
        build_model("lenet", IMAGE, 10)
    with pytest.raises(ValueError, match=r"model .vit. has no option.s. width; accepted: embed_dim \(int, default "
                                         r"192\), depth"):
        build_model("vit", IMAGE, 10, width=3)
    with pytest.raises(ValueError, match="patch_size=5 must divide the image size 28x28"):
        build_model("vit", IMAGE, 10, patch_size=5)
    with pytest.raises(ValueError, match=r"input_shape must be \(C, L\) or \(C, H, W\)"):
        build_model("mlp", (40,), 10)
