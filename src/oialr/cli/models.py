"""The CLI's models: an MLP, a small 1-D/2-D CNN, a mini-ViT and a 28×28 ResNet-18 (timm), and a byte-level Llama
language model (Hugging Face transformers, built from a config); never pretrained.

Every model registers its output layer (the classifier head, Llama's ``lm_head``; an ``nn.Linear``) last among its
Linear/Conv layers, so OIALR's rule "the output layer is the last eligible layer in registration order" keeps
exactly that layer dense.
"""
from __future__ import annotations

import inspect

from torch import Tensor, nn

MODEL_NAMES = ("mlp", "cnn", "vit", "resnet18", "llama")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` (one of ``MODEL_NAMES``) for samples of ``input_shape`` and ``num_classes`` outputs.

    ``input_shape`` is one sample without the batch: ``(C, L)`` for signals, ``(C, H, W)`` for images, ``(T,)``
    (the context length) for text, whose ``num_classes`` is the vocabulary. ``kwargs`` are the chosen builder's
    options (``mlp``, ``cnn``, ``vit``, ``resnet18``, ``llama`` below); an unknown one is an error.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    input_shape = tuple(int(d) for d in input_shape)
    dims = (1,) if name == "llama" else (2, 3)
    if len(input_shape) not in dims or min(input_shape) < 1:
        expected = "(T,) for text" if name == "llama" else "(C, L) or (C, H, W)"
        raise ValueError(f"input_shape must be {expected} with positive sizes, got {input_shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    problems = option_problems(name, kwargs)
    if problems:
        raise ValueError("; ".join(problems))
    return _BUILDERS[name](input_shape, num_classes, **kwargs)


def option_problems(name: str, kwargs: dict) -> list[str]:
    """What is wrong with ``kwargs`` as options of model ``name``: unknown names, or values not of the type the
    builder's signature declares (``int``: an integer >= 1, every one is a size or a count; ``float``: a number
    > 0; ``bool``; ``tuple[int, ...]``: a non-empty list of integers >= 1; ``| None``: also null)."""
    params = list(inspect.signature(_BUILDERS[name]).parameters.values())[2:]
    accepted = ", ".join(f"{p.name} ({p.annotation}, default {p.default!r})" for p in params) or "none"
    types = {p.name: p.annotation for p in params}
    unknown = sorted(set(kwargs) - set(types))
    if unknown:
        return [f"model {name!r} has no option(s) {', '.join(unknown)}; accepted: {accepted}"]
    return [f"model_args.{key} must be {_TYPE_WORDS[types[key].removesuffix(' | None')]}"
            f"{' or null' if types[key].endswith(' | None') else ''}, got {value!r}"
            for key, value in kwargs.items() if not _fits(types[key], value)]


_TYPE_WORDS = {"int": "an integer >= 1", "float": "a number > 0", "bool": "true or false",
               "tuple[int, ...]": "a non-empty list of integers >= 1"}


def _fits(annotation: str, value) -> bool:
    if annotation.endswith(" | None"):
        return value is None or _fits(annotation.removesuffix(" | None"), value)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if annotation == "int":
        return is_int and value >= 1
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    if annotation == "bool":
        return isinstance(value, bool)
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_fits("int", v) for v in value)


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 256, depth: int = 2) -> nn.Module:
    """Flatten -> ``depth`` × (Linear(·, width) -> ReLU) -> Linear(width, num_classes): ``(B, *input_shape) -> (B, K)``.
    """
    if width < 1 or depth < 1:
        raise ValueError(f"mlp needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
    d = 1
    for size in input_shape:
        d *= size
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(d if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv -> (BatchNorm) -> ReLU stages, global average pooling, Linear head; 1-D or 2-D convolutions.

    ``(B, C, L) -> (B, K)`` with ``spatial_dims=1``, ``(B, C, H, W) -> (B, K)`` with ``spatial_dims=2``. With the
    default strides (1, 2, 2, 1) a 28×28 image is seen at 28, 28, 14, 7 pixels and a length-40 signal at 40, 40, 20, 10.
    """

    def __init__(self, in_channels: int, num_classes: int, *, spatial_dims: int = 2,
                 channels: tuple[int, ...] = (32, 64, 128, 128), strides: tuple[int, ...] = (1, 2, 2, 1),
                 kernel_size: int = 3, batch_norm: bool = True):
        super().__init__()
        if spatial_dims not in (1, 2):
            raise ValueError(f"spatial_dims must be 1 or 2, got {spatial_dims}")
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels and strides need the same, non-zero length, got {channels} and {strides}")
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if spatial_dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, stride in zip(channels, strides):
            layers.append(conv(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=not batch_norm))
            layers += [norm(c_out), nn.ReLU()] if batch_norm else [nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1) if spatial_dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))       # (B, C', *S) -> (B, C') -> (B, K)


def cnn(input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] = (32, 64, 128, 128),
        kernel_size: int | None = None, batch_norm: bool = True) -> nn.Module:
    """``SmallCNN`` for signals ``(C, L)`` (Conv1d, kernel 5 by default) or images ``(C, H, W)`` (Conv2d, kernel 3)."""
    spatial_dims = len(input_shape) - 1
    if kernel_size is None:
        kernel_size = 5 if spatial_dims == 1 else 3
    strides = tuple(1 if i in (0, len(channels) - 1) else 2 for i in range(len(channels)))
    return SmallCNN(input_shape[0], num_classes, spatial_dims=spatial_dims, channels=tuple(channels),
                    strides=strides, kernel_size=kernel_size, batch_norm=batch_norm)


def vit(input_shape: tuple[int, ...], num_classes: int, embed_dim: int = 192, depth: int = 6, num_heads: int = 3,
        patch_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = False) -> nn.Module:
    """Mini-ViT (timm ``VisionTransformer``) for images ``(C, H, W)``: 7×7 patches (16 tokens at 28×28) + a class
    token, 6 blocks of width 192 with 3 heads, no qkv bias (as in the OIALR paper's mini-ViT), head on the class token.
    """
    _need_images("vit", input_shape)
    _, h, w = input_shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"vit: patch_size={patch_size} must divide the image size {h}x{w}")
    if embed_dim % num_heads:
        raise ValueError(f"vit: embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    VisionTransformer = _timm().models.vision_transformer.VisionTransformer
    return VisionTransformer(img_size=(h, w), patch_size=patch_size, in_chans=input_shape[0], num_classes=num_classes,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                             qkv_bias=qkv_bias, class_token=True, global_pool="token")


def resnet18(input_shape: tuple[int, ...], num_classes: int, small_stem: bool = True) -> nn.Module:
    """timm ResNet-18 (random init) for images ``(C, H, W)``.

    ``small_stem=True``: the ImageNet stem (7×7 stride-2 conv, then a stride-2 max-pool) would shrink 28×28 to 7×7
    before the first residual stage; it is replaced by a 3×3 stride-1 conv and no max-pool, so the stages run at 28,
    14, 7 and 4 pixels. ``small_stem=False`` keeps timm's stem: stages at 7, 4, 2 and 1 pixels, about 16× fewer
    multiply-adds (what makes ResNet-18 experiments fit a CPU), at some cost in accuracy.
    """
    _need_images("resnet18", input_shape)
    if not isinstance(small_stem, bool):
        raise ValueError(f"small_stem must be true or false, got {small_stem!r}")
    model = _timm().create_model("resnet18", pretrained=False, in_chans=input_shape[0], num_classes=num_classes)
    if small_stem:       # reassigning existing attributes keeps their registration order, so `fc` stays the last layer
        model.conv1 = nn.Conv2d(input_shape[0], model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


class CausalLM(nn.Module):
    """``(B, T)`` int64 token ids -> ``(B, T, V)`` next-token logits of a Hugging Face causal LM (``self.lm``)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x: Tensor) -> Tensor:
        return self.lm(input_ids=x, use_cache=False).logits


def llama(input_shape: tuple[int, ...], num_classes: int, hidden_size: int = 384, num_hidden_layers: int = 4,
          num_attention_heads: int = 6, num_key_value_heads: int | None = None, intermediate_size: int = 1024,
          tie_word_embeddings: bool = False, initializer_range: float = 0.02) -> nn.Module:
    """Decoder-only Llama (``transformers.LlamaForCausalLM`` from a ``LlamaConfig``, random init) for token windows
    ``(T,)``: vocabulary ``num_classes`` (256 bytes), context ``T``, RMSNorm, rotary positions, SwiGLU MLP.

    Per block: attention ``q/k/v/o_proj`` (``d×d``; k/v ``d·kv/heads × d`` with fewer key-value heads) and MLP
    ``gate/up_proj (f×d)``, ``down_proj (d×f)``: the layers OIALR and the low-rank peers factor. The embedding and
    ``lm_head (V×d)`` stay dense (an ``nn.Embedding`` is no eligible layer; ``lm_head`` is the output layer). The
    default, width 384, 4 blocks, 6 heads, MLP 1024 (7.28M parameters), is ``configs/lm_llama.yaml``'s (measured
    step time there).
    """
    hidden_size, layers, heads = int(hidden_size), int(num_hidden_layers), int(num_attention_heads)
    kv_heads = heads if num_key_value_heads is None else int(num_key_value_heads)
    if min(hidden_size, layers, heads, kv_heads, int(intermediate_size)) < 1:
        raise ValueError("llama sizes must be >= 1, got hidden_size={}, num_hidden_layers={}, num_attention_heads={}, "
                         "num_key_value_heads={}, intermediate_size={}".format(hidden_size, layers, heads, kv_heads,
                                                                               intermediate_size))
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(f"llama: hidden_size={hidden_size} must be divisible by num_attention_heads={heads}, and "
                         f"that by num_key_value_heads={kv_heads}")
    transformers = _transformers()
    config = transformers.LlamaConfig(
        vocab_size=num_classes, max_position_embeddings=input_shape[0], hidden_size=hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=int(intermediate_size), tie_word_embeddings=bool(tie_word_embeddings),
        initializer_range=float(initializer_range), use_cache=False)
    return CausalLM(transformers.LlamaForCausalLM(config))


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"the llama model needs transformers ({exc}): pip install 'oialr[lm]'") from None
    return transformers


def _need_images(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs images (C, H, W), got input_shape {input_shape}; "
                         "use mlp or cnn for 1-D signals such as mnist1d")


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ImportError(f"the vit and resnet18 models need timm ({exc}): pip install timm "
                          "(or pip install -e .[vision])") from None
    import timm.models.vision_transformer  # noqa: F401  (make the submodule an attribute for the caller)
    return timm


_BUILDERS = {"mlp": mlp, "cnn": cnn, "vit": vit, "resnet18": resnet18, "llama": llama}
