import pytest

from oialr import AutoTransition, OIALRConfig


def test_defaults_are_valid_and_plain():
    cfg = OIALRConfig()
    d = cfg.to_dict()
    assert d["warmup_steps"] == 1000 and d["update_every"] == 100 and d["cutoff"] == 0.1
    assert OIALRConfig(**d) == cfg


@pytest.mark.parametrize("field, value, fragment", [
    ("warmup_steps", -1, "warmup_steps must be an integer >= 0"),
    ("warmup_steps", 1.5, "warmup_steps must be an integer >= 0"),
    ("warmup_steps", True, "warmup_steps must be an integer >= 0"),
    ("update_every", 0, "update_every must be an integer >= 1"),
    ("cutoff", 1.0, "cutoff must be a number in [0, 1)"),
    ("cutoff", -0.1, "cutoff must be a number in [0, 1)"),
    ("cutoff", float("nan"), "cutoff must be a number in [0, 1)"),
    ("rank_fraction", 0.0, "rank_fraction must be a number in (0, 1]"),
    ("rank_fraction", 1.5, "rank_fraction must be a number in (0, 1]"),
    ("min_rank", 0, "min_rank must be an integer >= 1"),
    ("max_drop_fraction", -0.1, "max_drop_fraction must be a number in [0, 1]"),
    ("max_drop_fraction", 1.5, "max_drop_fraction must be a number in [0, 1]"),
    ("target_modules", 3, "target_modules must be None, a regular expression string or a list"),
    ("exclude_modules", [""], "exclude_modules must be None, a regular expression string or a list"),
    ("keep_output_layer_dense", "yes", "keep_output_layer_dense must be True or False"),
    ("max_aspect_ratio", 0.5, "max_aspect_ratio must be None or a number >= 1"),
])
def test_each_bad_field_is_named(field, value, fragment):
    with pytest.raises(ValueError) as err:
        OIALRConfig(**{field: value})
    assert fragment in str(err.value)
    assert repr(value) in str(err.value)


@pytest.mark.parametrize("auto, fragment", [
    ({"every": 0}, "auto.every must be an integer >= 1, got 0"),
    ({"lag": 0}, "auto.lag must be an integer >= 1, got 0"),
    ({"window": 0, "threshold": 2}, "auto.window must be an integer >= 1"),
    ({"window": 0, "threshold": 2}, "auto.threshold must be a number in (-1, 1]"),
    ({"every": 5, "laag": 2}, "auto takes the fields every, lag, threshold"),
    (3, "auto must be an AutoTransition or a mapping of its fields, got 3"),
])
def test_auto_settings_are_validated_with_their_prefix(auto, fragment):
    with pytest.raises(ValueError) as err:
        OIALRConfig(warmup_steps="auto", auto=auto, cutoff=2.0)
    assert fragment in str(err.value) and "cutoff must be" in str(err.value)


def test_auto_settings_from_a_mapping_an_object_and_older_flat_names():
    given = OIALRConfig(warmup_steps="auto", auto={"every": 7, "max_steps": 900})
    assert given.auto == AutoTransition(every=7, max_steps=900)
    assert OIALRConfig.from_dict(given.to_dict()) == given
    legacy = {k: v for k, v in OIALRConfig().to_dict().items() if k != "auto"}
    legacy.update(warmup_steps="auto", stability_every=7, auto_max_steps=900, auto_window=4)
    assert OIALRConfig.from_dict(legacy) == given


def test_all_errors_reported_at_once():
    with pytest.raises(ValueError) as err:
        OIALRConfig(cutoff=2.0, update_every=0)
    assert "cutoff" in str(err.value) and "update_every" in str(err.value)


def test_tuple_target_modules_become_list():
    assert OIALRConfig(target_modules=("fc1", "fc2")).target_modules == ["fc1", "fc2"]
