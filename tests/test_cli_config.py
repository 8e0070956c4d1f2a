import importlib.util
import os
import sys

import pytest

from oialr.cli.settings import ConfigError, TrainConfig, build_config, load_yaml


def test_defaults_are_the_embedded_run():
    cfg = build_config()
    assert cfg == TrainConfig()
    assert (cfg.dataset, cfg.model, cfg.method) == ("mnist1d", "cnn", "oialr")


def test_precedence_file_then_flags_then_set():
    cfg = build_config({"epochs": 5, "lr": 0.1, "oialr": {"cutoff": 0.3}}, ["lr=0.2", "oialr.update_every=7"],
                       epochs=9, lr=None)
    assert cfg.epochs == 9 and cfg.lr == 0.2
    assert cfg.oialr.cutoff == 0.3 and cfg.oialr.update_every == 7


def test_set_values_are_yaml_and_model_args_nest():
    cfg = build_config(overrides=["grad_clip=null", "model_args.depth=3", "oialr.target_modules=[fc1, fc2]",
                                  "augment=false"])
    assert cfg.grad_clip is None and cfg.model_args == {"depth": 3} and cfg.augment is False
    assert cfg.oialr.target_modules == ["fc1", "fc2"]


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        build_config({"epochs": 0, "bogus": 1}, ["oialr.cutoff=2", "lr=-1", "nokey"], model="vit")
    text = str(err.value)
    for fragment in ["unknown setting 'bogus' (config file)", "--set expects key=value, got 'nokey'",
                     "oialr.cutoff must be a number in [0, 1), got 2"]:
        assert fragment in text, fragment


def test_semantic_errors():
    with pytest.raises(ConfigError) as err:
        build_config({"epochs": 0, "lr": -1.0, "model": "vit", "dataset": "mnist1d", "stability_lag": 0,
                      "compile": "sometimes"})
    text = str(err.value)
    assert "compile must be true or false, got 'sometimes'" in text
    assert "epochs must be an integer >= 1, got 0" in text
    assert "stability_lag must be an integer >= 1, got 0" in text
    assert "lr must be a number in (0, inf), got -1.0" in text
    assert "model 'vit' needs images" in text


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(str(listy))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_shipped_configs_are_valid(name):
    cfg = build_config(load_yaml(os.path.join(ROOT, "configs", name)))
    assert cfg.epochs >= 1


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "benchmarks", "grids"))))
def test_every_run_of_the_shipped_grids_is_valid(name, monkeypatch):
    spec = importlib.util.spec_from_file_location("experiments", os.path.join(ROOT, "benchmarks", "experiments.py"))
    experiments = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "experiments", experiments)     # its dataclass looks itself up there
    spec.loader.exec_module(experiments)
    grid = load_yaml(os.path.join(ROOT, "benchmarks", "grids", name))
    base = load_yaml(os.path.join(ROOT, grid["base"]))
    for group, settings in grid["groups"].items():
        for seed in grid["seeds"]:
            cfg = build_config(base, experiments.flatten(settings), seed=seed)
            assert cfg.seed == seed, group
