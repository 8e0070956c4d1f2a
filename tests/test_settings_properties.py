"""Property-based tests of the settings: any combination of values builds a configuration or is refused with one
line per problem (ConfigError, exit code 2) — never a traceback, never another exception."""
import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from oialr import OIALRConfig  # noqa: E402
from oialr.cli import start as cli_start  # noqa: E402
from oialr.cli.main import main  # noqa: E402
from oialr.cli.models import MODEL_NAMES, option_problems  # noqa: E402
from oialr.cli.settings import ConfigError, TrainConfig, build_config, flat_settings  # noqa: E402

KEYS = sorted(flat_settings(TrainConfig())) + ["model_args.width", "model_args.depth", "model_args.channels",
                                               "model_args.nope", "nope", "oialr.nope", "oialr.auto.nope", "oialr",
                                               "oialr.auto", "model_args", ""]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6),
                   st.floats(allow_subnormal=False),     # TrainingRun.setup flushes denormals to zero
                   st.text(max_size=12), st.lists(st.integers(-3, 300), max_size=3),
                   st.dictionaries(st.text(max_size=6), st.integers(), max_size=2))
FEW = settings(max_examples=60, deadline=None)


def as_text(value) -> str:
    """A ``--set`` value: JSON (a subset of YAML) for structured values, the raw text for strings."""
    return value if isinstance(value, str) else json.dumps(value)


def assert_one_line_problems(err: ConfigError) -> None:
    problems = getattr(err, "problems", [str(err)])
    assert problems and all(p and "\n" not in p for p in problems), str(err)


@FEW
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4))
def test_any_set_overrides_build_or_are_refused_one_line_per_problem(overrides):
    items = [f"{k}={as_text(v)}" for k, v in overrides.items()]
    try:
        cfg = build_config(None, items)
    except ConfigError as err:
        assert_one_line_problems(err)
    else:
        assert isinstance(cfg, TrainConfig) and isinstance(cfg.oialr, OIALRConfig)


@FEW
@given(st.dictionaries(st.sampled_from([k for k in KEYS if k]), VALUES, max_size=4))
def test_any_config_file_mapping_builds_or_is_refused_one_line_per_problem(values):
    nested: dict = {}
    for key, value in values.items():
        *heads, last = key.split(".")
        target = nested
        for head in heads:
            target = target.setdefault(head, {}) if isinstance(target.get(head, {}), dict) else {}
        target[last] = value
    try:
        build_config(nested)
    except ConfigError as err:
        assert_one_line_problems(err)


@FEW
@given(st.dictionaries(st.sampled_from(["cutoff", "rank_fraction", "min_rank", "warmup_steps", "update_every",
                                        "max_drop_fraction", "target_modules", "exclude_modules",
                                        "keep_output_layer_dense", "max_aspect_ratio", "auto"]), VALUES, max_size=4))
def test_any_oialr_config_builds_or_is_a_value_error(kwargs):
    try:
        OIALRConfig(**kwargs)
    except ValueError as err:
        assert_one_line_problems(err)


@FEW
@given(st.sampled_from(MODEL_NAMES), st.dictionaries(st.sampled_from(
    ["width", "depth", "channels", "kernel_size", "batch_norm", "embed_dim", "mlp_ratio", "num_key_value_heads",
     "nope"]), VALUES, max_size=3))
def test_any_model_args_are_accepted_or_named(model, kwargs):
    problems = option_problems(model, kwargs)
    assert all(isinstance(p, str) and "\n" not in p for p in problems)


class Started(Exception):
    """Raised instead of training: the settings were accepted."""


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["--epochs", "--batch-size", "--lr", "--seed", "--set", "--model",
                                           "--dataset", "--method"]), VALUES.map(as_text)), max_size=4))
def test_the_train_command_starts_or_exits_2_without_a_traceback(options):
    argv = ["train", "--out", "/nonexistent/never-written"]
    for flag, value in options:
        argv += [flag, value]

    def started(*args, **kwargs):
        raise Started

    real = cli_start.start_or_resume
    cli_start.start_or_resume = started
    try:
        code = main(argv)
    except Started:
        return
    except SystemExit as exit:                          # argparse: a flag's value of the wrong type
        code = exit.code
    finally:
        cli_start.start_or_resume = real
    assert code == 2
