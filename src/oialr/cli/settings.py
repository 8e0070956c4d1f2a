"""TrainConfig: every setting of a training run; loaded from defaults, a YAML file and ``key=value`` overrides."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .._checks import Errors, is_int, is_real
from ..auto_transition import AutoTransition
from ..baselines import GALORE_PROJ_TYPES
from ..baselines.ranks import check_rank_spec
from ..config import OIALRConfig

DATASETS = ("mnist1d", "fashion-mnist", "text")
MODELS = ("mlp", "cnn", "vit", "resnet18", "llama")
METHODS = ("full-rank", "oialr", "factorized", "svd-finetune", "galore")
OPTIMIZERS = ("adamw", "sgd")
PARALLEL = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A bad setting; the message lists every problem found, one per line."""


@dataclass
class TrainConfig:
    """A training run. Step counts (``oialr.*``) are optimizer steps; the learning-rate warm-up is in epochs.

    dataset, data_dir: ``mnist1d`` (generated), ``fashion-mnist`` (IDX files in ``data_dir``; default: the
        Debian package's folder) or ``text`` (bytes of a text file or a folder of them in ``data_dir``; default:
        Debian's fortunes; windows of ``context_length`` bytes). model: ``mlp``, ``cnn``, ``vit`` (images only),
        ``resnet18`` (images only), ``llama`` (text only); ``model_args`` are passed to the model builder (e.g.
        ``{depth: 4}``). method: ``full-rank``, ``oialr``, or a peer (``oialr.baselines``): ``factorized`` (two
        trained factors from step 0), ``svd-finetune`` (full-rank for ``oialr.warmup_steps`` steps, then two
        trained factors), ``galore`` (gradient projected to rank ``rank`` for AdamW's moments).
    rank: the peers' rank per layer: a fraction of its full rank in (0, 1], an integer, or the path of a finished
        OIALR run's results.json (its final ranks). galore_update_proj_gap, galore_scale, galore_proj_type: GaLore's
        projector refresh interval (steps), update scale and projection side.
    eval_every: also evaluate (and write a metrics row and a checkpoint) every this many steps within an epoch;
        ``null`` = at the end of each epoch only. For text, one epoch is one pass over the training bytes.
    epochs, batch_size, seed: the usual. augment: random crop + flip for images (never for MNIST-1D).
    optimizer: ``adamw`` or ``sgd`` (with ``momentum``); lr, weight_decay; learning rate: linear warm-up over
        ``lr_warmup_epochs``, then cosine to 0. label_smoothing; grad_clip: max gradient norm (``null`` = off).
    threads: torch intra-op threads (``null`` = torch's default). dist_timeout: under torchrun, seconds a process
        waits for the others in a collective before the run ends with an error naming it (a setting of this launch:
        ``--resume`` may change it). compile: train through ``torch.compile(model)``
        (recompiled when the transition or a rank change replaces Σ; evaluation stays eager).
    parallel: under torchrun, ``ddp`` (every process holds the whole model) or ``fsdp`` (FSDP2: every layer OIALR
        converts is its own unit, the parameters, gradients and optimizer state sharded by rows; checkpoints are
        ``torch.distributed.checkpoint`` folders, also with one process); methods ``oialr`` and ``full-rank`` only,
        without ``compile``, ``stability_every``, ``oialr.augment_bases`` or ``oialr.warmup_steps: auto``
        (``docs/DISTRIBUTED.md``).
        oialr: :class:`oialr.OIALRConfig` fields.
    stability_every: record every layer's basis stability every this many steps for the whole run
        (``stability.jsonl``/``.csv``, plots by ``oialr stability DIR``); ``null`` = off. stability_lag: compare each
        sample with the one this many samples earlier (bases ``stability_lag · stability_every`` steps apart).
    """

    dataset: str = "mnist1d"
    data_dir: str | None = None
    model: str = "cnn"
    model_args: dict = field(default_factory=dict)
    method: str = "oialr"
    epochs: int = 30
    batch_size: int = 128
    seed: int = 0
    augment: bool = True
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    lr_warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 5.0
    threads: int | None = None
    dist_timeout: float = 300.0
    compile: bool = False
    parallel: str = "ddp"
    stability_every: int | None = None
    stability_lag: int = 1
    context_length: int = 256
    eval_every: int | None = None
    rank: float | int | str = 0.25
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    galore_proj_type: str = "std"
    oialr: OIALRConfig = field(default_factory=lambda: OIALRConfig(warmup_steps=300, update_every=60, cutoff=0.1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _errors(cfg: TrainConfig) -> list[str]:
    errors = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def positive_int(name: str) -> None:
        value = getattr(cfg, name)
        check(is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")

    def number(name: str, low: float, high: float = math.inf, allow_none: bool = False, low_open=False) -> None:
        value = getattr(cfg, name)
        if value is None and allow_none:
            return
        ok = is_real(value) and (value > low if low_open else value >= low) and value <= high
        interval = f"{'(' if low_open else '['}{low}, {high if high != math.inf else 'inf'})"
        check(ok, f"{name} must be a number in {interval}{' or null' if allow_none else ''}, got {value!r}")

    check(cfg.dataset in DATASETS, f"dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    check(cfg.model in MODELS, f"model must be one of {', '.join(MODELS)}, got {cfg.model!r}")
    check(cfg.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    check(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    check(not (cfg.dataset == "mnist1d" and cfg.model in ("vit", "resnet18")),
          f"model {cfg.model!r} needs images; use --dataset fashion-mnist or --model mlp/cnn")
    check((cfg.dataset == "text") == (cfg.model == "llama"),
          f"dataset 'text' and model 'llama' go together, got dataset {cfg.dataset!r} with model {cfg.model!r}")
    positive_int("context_length")
    check(cfg.eval_every is None or (is_int(cfg.eval_every) and cfg.eval_every >= 1),
          f"eval_every must be an integer >= 1 or null, got {cfg.eval_every!r}")
    rank_problem = check_rank_spec(cfg.rank)
    check(rank_problem is None, str(rank_problem))
    positive_int("galore_update_proj_gap")
    number("galore_scale", 0, low_open=True)
    check(cfg.galore_proj_type in GALORE_PROJ_TYPES,
          f"galore_proj_type must be one of {', '.join(GALORE_PROJ_TYPES)}, got {cfg.galore_proj_type!r}")
    check(cfg.method != "galore" or cfg.optimizer == "adamw",
          f"method 'galore' is an AdamW (GaLoreAdamW); set optimizer: adamw, got {cfg.optimizer!r}")
    check(cfg.method != "svd-finetune" or is_int(cfg.oialr.warmup_steps),
          f"method 'svd-finetune' truncates after oialr.warmup_steps full-rank steps, which must be an integer, got "
          f"{cfg.oialr.warmup_steps!r}")
    check(cfg.data_dir is None or isinstance(cfg.data_dir, str), f"data_dir must be a path, got {cfg.data_dir!r}")
    check(isinstance(cfg.model_args, dict), f"model_args must be a mapping, got {cfg.model_args!r}")
    for name in ("epochs", "batch_size"):
        positive_int(name)
    check(is_int(cfg.seed) and cfg.seed >= 0,
          f"seed must be an integer >= 0, got {cfg.seed!r}")
    for name in ("augment", "compile"):
        check(isinstance(getattr(cfg, name), bool), f"{name} must be true or false, got {getattr(cfg, name)!r}")
    number("lr", 0, low_open=True)
    number("weight_decay", 0)
    number("momentum", 0, 1)
    number("lr_warmup_epochs", 0)
    number("label_smoothing", 0, 1)
    number("grad_clip", 0, allow_none=True, low_open=True)
    check(cfg.stability_every is None or (is_int(cfg.stability_every) and cfg.stability_every >= 1),
          f"stability_every must be an integer >= 1 or null, got {cfg.stability_every!r}")
    positive_int("stability_lag")
    auto = cfg.oialr.auto
    check(cfg.method != "oialr" or cfg.oialr.warmup_steps != "auto" or cfg.stability_every is None
          or (cfg.stability_every, cfg.stability_lag) == (auto.every, auto.lag),
          f"stability_every/stability_lag ({cfg.stability_every}/{cfg.stability_lag}) must equal oialr.auto.every/"
          f"lag ({auto.every}/{auto.lag}): the automatic transition reads the run's stability series; set both alike")
    number("dist_timeout", 0, 86400, low_open=True)
    check(cfg.parallel in PARALLEL, f"parallel must be one of {', '.join(PARALLEL)}, got {cfg.parallel!r}")
    if cfg.parallel == "fsdp":
        clashes = [what for what, on in (
            (f"method {cfg.method!r} (fsdp trains oialr or full-rank)", cfg.method not in ("oialr", "full-rank")),
            ("compile: true", cfg.compile is True), ("stability_every", cfg.stability_every is not None),
            ("oialr.augment_bases", cfg.oialr.augment_bases is True),
            ("oialr.warmup_steps: auto", cfg.method == "oialr" and cfg.oialr.warmup_steps == "auto")) if on]
        check(not clashes, f"parallel: fsdp does not support {', '.join(clashes)}; use parallel: ddp or leave "
                           "them unset")
    check(cfg.threads is None or (is_int(cfg.threads) and cfg.threads >= 1),
          f"threads must be an integer >= 1 or null, got {cfg.threads!r}")
    return errors


def build_config(file_values: dict | None = None, overrides: list[str] | None = None,
                 **flags: Any) -> TrainConfig:
    """Defaults, then ``file_values`` (a parsed YAML mapping), then ``flags`` (CLI options that were given), then
    ``overrides`` (``"key=value"``, dotted keys for ``oialr.*`` and ``model_args.*``; values parsed as YAML).
    Raises :class:`ConfigError` listing every problem at once."""
    values: dict[str, Any] = TrainConfig().to_dict()
    errors = Errors()
    layers = [("config file", file_values or {}), ("option", {k: v for k, v in flags.items() if v is not None})]
    parsed_overrides: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            errors.check(False, f"--set expects key=value, got {item!r}")
            continue
        parsed_overrides[key.strip()] = _parse_value(raw)
    layers.append(("--set", parsed_overrides))
    for source, mapping in layers:
        if not isinstance(mapping, dict):
            errors.check(False, f"{source} must be a mapping of settings, got {type(mapping).__name__}")
            continue
        for key, value in _flatten(mapping).items():
            errors.messages.extend(_assign(values, key, value, source))
    oialr_values = values.pop("oialr")
    try:
        values["oialr"] = OIALRConfig(**oialr_values)
    except ValueError as err:
        errors.nested(err, "oialr.")
    if not errors.messages:
        cfg = TrainConfig(**values)
        errors.messages.extend(_errors(cfg))
    errors.raise_if_any("training configuration", ConfigError)
    return cfg


def given_settings(file_values: dict | None = None, overrides: list[str] | None = None, **flags: Any) -> set[str]:
    """The dotted names of the settings that ``build_config`` with these arguments takes from the user rather than
    from the defaults (``{"epochs", "oialr.cutoff", "model_args.width"}``)."""
    given = set(_flatten(file_values)) if isinstance(file_values, dict) else set()
    given |= {k for k, v in flags.items() if v is not None}
    given |= {item.partition("=")[0].strip() for item in overrides or []}
    return given


def flat_settings(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting of ``cfg`` under its dotted name, as :func:`given_settings` names them."""
    return _flatten(cfg.to_dict())


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"oialr": {"cutoff": 0.2, "auto": {"lag": 2}}}`` -> ``{"oialr.cutoff": 0.2, "oialr.auto.lag": 2}``;
    ``model_args`` values stay whole."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name in ("oialr", "oialr.auto"):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, dict) and name == "model_args":
            flat.update({f"model_args.{k}": v for k, v in value.items()})
        else:
            flat[name] = value
    return flat


def _assign(values: dict[str, Any], key: str, value: Any, source: str) -> list[str]:
    head, _, rest = key.partition(".")
    oialr_fields = {f.name for f in dataclasses.fields(OIALRConfig)} - {"auto"}
    auto_fields = {f.name for f in dataclasses.fields(AutoTransition)}
    if head == "oialr" and rest in oialr_fields:
        values["oialr"][rest] = value
    elif head == "oialr" and rest.startswith("auto.") and rest[5:] in auto_fields:
        values["oialr"]["auto"][rest[5:]] = value
    elif head == "model_args" and rest:
        values["model_args"][rest] = value
    elif not rest and head in values and head not in ("oialr", "model_args"):
        values[head] = value
    else:
        known = sorted(k for k in values if k not in ("oialr", "model_args"))
        return [f"unknown setting {key!r} ({source}); known: {', '.join(known)}, model_args.<name>, "
                f"oialr.<{'|'.join(sorted(oialr_fields))}>, oialr.auto.<{'|'.join(sorted(auto_fields))}>"]
    return []


def _parse_value(raw: str) -> Any:
    import yaml
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load_yaml(path: str) -> dict:
    """Read a YAML config file; errors name the file."""
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data
