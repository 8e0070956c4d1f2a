"""The training CLI end to end on tiny MNIST-1D runs: results, files, exact resume, interrupts, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from interrupt import interrupt_after
from oialr import PlateauRule, from_pretrained
from oialr.cli.models import build_model
from oialr.cli.interrupts import Interrupted
from oialr.cli.start import start_or_resume
from oialr.cli.settings import ConfigError, build_config
from oialr.cli.main import main


def assert_no_pickle(out):
    """Every file of a run folder that holds tensors loads without pickle (torch weights_only, or safetensors)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(".pt"):
                torch.load(path, weights_only=True)
            elif name.endswith(".safetensors"):
                safetensors_torch.load_file(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An MNIST-1D cache folder shared by the tests (generation takes ~2 s)."""
    return str(tmp_path_factory.mktemp("mnist1d"))


def tiny(data_dir, **extra):
    overrides = {"dataset": "mnist1d", "data_dir": data_dir, "model": "mlp", "model_args": {"width": 32},
                 "epochs": 3, "batch_size": 256, "threads": 1,
                 "oialr": {"warmup_steps": 20, "update_every": 7, "cutoff": 0.2}}
    overrides.update(extra)
    return build_config(overrides)


def test_run_writes_results_and_files(data_dir, tmp_path):
    out = str(tmp_path / "run")
    run = start_or_resume(tiny(data_dir), out, resume=False, log=lambda *a: None)
    results = run.train()
    for name in ("results.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "model/model.safetensors",
                 "model/oialr_config.json", "compact/model.safetensors", "compact/oialr_config.json", "curves.png",
                 "ranks.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert_no_pickle(out)
    cfg = run.cfg
    exported = from_pretrained(build_model(cfg.model, run.data.input_shape, run.data.num_classes,
                                           **cfg.model_args), os.path.join(out, "compact"))
    assert not any(type(m).__module__.startswith("oialr") for m in exported.modules())
    assert sum(p.numel() for p in exported.parameters()) == results["compact_params"] < results["stored_params"]
    trained = from_pretrained(build_model(cfg.model, run.data.input_shape, run.data.num_classes, **cfg.model_args),
                              os.path.join(out, "model"))
    x = torch.randn(5, 1, 40)
    run.model.eval()
    torch.testing.assert_close(exported.eval()(x), run.model(x), rtol=1e-4, atol=1e-5)
    assert torch.equal(trained.eval()(x), run.model(x))
    saved_config = json.load(open(os.path.join(out, "model", "oialr_config.json")))["config"]
    assert saved_config == cfg.oialr.to_dict()
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved == json.loads(json.dumps(results))
    assert 0.0 <= saved["top1"] <= 1.0 and saved["best_top1"] >= saved["top1"]
    assert saved["method"] == "oialr" and saved["world_size"] == 1 and saved["steps"] == 3 * 15
    assert saved["trainable_params"] < saved["dense_params"]
    assert saved["transition_step"] == 20
    assert set(saved["layers"]) == {"1", "3"} and saved["config"]["oialr"]["cutoff"] == 0.2
    assert saved["stored_budget"] is None and saved["stored_fraction"] == saved["cut_stored_fraction"] == sum(
        layer["stored_params"] for layer in saved["layers"].values()) / sum(
        layer["dense_params"] for layer in saved["layers"].values())
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["phase"] == "full-rank" and rows[-1]["phase"] == "low-rank"


def test_full_rank_method_has_no_controller(data_dir, tmp_path):
    run = start_or_resume(tiny(data_dir, method="full-rank", epochs=1), str(tmp_path / "fr"), False,
                                 log=lambda *a: None)
    results = run.train()
    assert run.controller is None and results["trainable_params"] == results["dense_params"]


def test_compile_trains_like_eager(data_dir, tmp_path, monkeypatch):
    """``compile: true`` trains through torch.compile (backend aot_eager here, to keep the test fast), recompiled
    after the transition and the rank changes, with the eager run's losses and ranks."""
    compiled = []
    real = torch.compile

    def compile_(model, **kwargs):
        compiled.append(model)
        return real(model, backend="aot_eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    runs = {}
    for flag in (False, True):
        run = start_or_resume(tiny(data_dir, compile=flag, epochs=2), str(tmp_path / str(flag)), False,
                                     log=lambda *a: None)
        runs[flag] = (run.train(), run.metrics)
    (eager, eager_rows), (comp, comp_rows) = runs[False], runs[True]
    assert comp["layers"] == eager["layers"] and comp["transition_step"] == eager["transition_step"] == 20
    assert len(compiled) >= 2 and all(m is compiled[0] for m in compiled)     # the bare model, rebuilt after changes
    for a, b in zip(eager_rows, comp_rows):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_interrupt_then_resume_is_exact(data_dir, tmp_path, monkeypatch):
    cfg = tiny(data_dir)
    straight = start_or_resume(cfg, str(tmp_path / "a"), False, log=lambda *a: None)
    expected = straight.train()
    with monkeypatch.context() as m:
        interrupt_after(m, 26)                     # mid-epoch 2, after the transition and a rank update
        run = start_or_resume(cfg, str(tmp_path / "b"), False, log=lambda *a: None)
        with pytest.raises(Interrupted, match="at step 26"):
            run.train()
    resumed = start_or_resume(None, str(tmp_path / "b"), True, log=lambda *a: None)
    assert resumed.step == 26 and resumed.batch_in_epoch == 11
    got = resumed.train()
    assert got["top1"] == expected["top1"] and got["layers"] == expected["layers"]
    for key in ("train_loss", "train_top1", "test_loss"):        # the interrupted epoch's sums were kept too
        assert [m[key] for m in resumed.metrics] == pytest.approx([m[key] for m in straight.metrics], abs=1e-12)
    for (k1, v1), (k2, v2) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


HALF = {"warmup_steps": 0.5, "update_every": 7, "cutoff": 0.2}      # the warm-up ends half-way through the run


def test_warmup_longer_than_the_run_is_refused_or_given_as_a_fraction(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"^oialr.warmup_steps=20 is not reached before the run ends: 1 epochs x 15 "
                                          r"steps = 15 optimizer steps, so OIALR would train full-rank throughout; "
                                          r"give fewer steps, a fraction of the run \(--set oialr.warmup_steps=0.2\)"):
        start_or_resume(tiny(data_dir, epochs=1), str(tmp_path / "long"), False, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "long" / "checkpoint.pt")
    cfg = build_config(tiny(data_dir, epochs=1).to_dict(), ["oialr.warmup_steps=0.2"])
    results = start_or_resume(cfg, str(tmp_path / "fraction"), False, log=lambda *a: None).train()
    assert results["transition_step"] == 3 and results["transition_reason"] == "warmup_steps=3 reached"   # 0.2 · 15


def test_resume_refuses_other_settings_and_fresh_run_refuses_existing(data_dir, tmp_path):
    out = str(tmp_path / "c")
    start_or_resume(tiny(data_dir, epochs=1, oialr=HALF), out, False, log=lambda *a: None).train()
    with pytest.raises(ConfigError, match="already holds a run"):
        start_or_resume(tiny(data_dir, epochs=1, oialr=HALF), out, False)
    with pytest.raises(ConfigError, match="epochs: saved 1, given 2"):
        start_or_resume(tiny(data_dir, epochs=2, oialr=HALF), out, True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        start_or_resume(None, str(tmp_path / "none"), True)


def test_missing_dataset_is_one_line_without_traceback(tmp_path, capsys):
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nope"), "--model", "mlp",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and str(tmp_path / "nope") in err and "dataset-fashion-mnist" in err


def test_bad_settings_exit_2(tmp_path, capsys):
    assert main(["train", "--set", "oialr.cutoff=5", "--out", str(tmp_path / "r")]) == 2
    assert "oialr.cutoff must be a number in [0, 1)" in capsys.readouterr().err


def test_compare_table(data_dir, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    start_or_resume(tiny(data_dir, epochs=1, oialr=HALF), out, False, log=lambda *a: None).train()
    assert main(["compare", out, out]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| run | method | model | top1") and len(lines) == 4
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "results.json does not exist: is" in capsys.readouterr().err


def test_compare_by_epoch(tmp_path, capsys):
    for name, rows in {"a": [0.5, 0.625], "b": [0.75]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": i + 1, "test_top1": v, "train_loss": 2.0 - v}) + "\n" for i, v in enumerate(rows)))
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert main(["compare", "--by-epoch", *runs]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| test_top1 by epoch | 1 | 2 |", "|---|---|---|", "| a | 50.0 | 62.5 |", "| b | 75.0 | — |"]
    assert main(["compare", *runs, "--by-epoch", "--key", "train_loss"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "| a | 1.5000 | 1.3750 |"
    assert main(["compare", str(tmp_path), "--by-epoch"]) == 2
    assert "metrics.jsonl does not exist: is" in capsys.readouterr().err
    assert main(["compare", runs[0], "--by-epoch", "--key", "nope"]) == 2
    assert "is not a metrics file of oialr train (KeyError('nope'))" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    out = str(tmp_path / "sig")
    cmd = [sys.executable, "-m", "oialr", "train", "--dataset", "mnist1d", "--data-dir", data_dir, "--model", "mlp",
           "--epochs", "400", "--batch-size", "256", "--out", out, "--set", "threads=1",
           "--set", "model_args.width=16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300                             # a loaded machine starts slowly
    while not os.path.exists(metrics) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved" in err and "--resume" in err
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert 0 < state["step"] < 400 * 15


def test_stability_series_and_report(data_dir, tmp_path, capsys):
    out = str(tmp_path / "stab")
    run = start_or_resume(tiny(data_dir, stability_every=5, stability_lag=2), out, False, log=lambda *a: None)
    results = run.train()
    assert 0 < results["stability_overhead"] < 1
    records = [json.loads(line) for line in open(os.path.join(out, "stability.jsonl"))]
    assert [r["step"] for r in records] == list(range(5, 46, 5)) and records[-1]["lag_steps"] == 10
    assert records[1]["network_stability"] is None and records[2]["network_stability"] is not None
    assert set(records[-1]["layers"]) == {"1", "3", "5"}
    assert records[-1]["layers"]["1"]["mixing"] is not None
    assert main(["stability", out]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 9 and 0 < summary["fraction_90pct_of_final"] <= 1
    assert summary["auto_rule"] == PlateauRule.from_settings(run.cfg.oialr.auto).settings()
    for name in ("stability_network.png", "stability_layers.png", "spectra.png", "stability_summary.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert main(["stability", str(tmp_path)]) == 2
    assert "stability_every" in capsys.readouterr().err


def test_stability_summary_replays_the_automatic_rule():
    from oialr.cli.stability_report import summarize
    series = [None, 0.5, 0.8, 0.95, 0.97, 0.975, 0.976, 0.976, 0.977, 0.977]        # rises, then plateaus
    records = [{"step": 100 * (i + 1), "network_stability": v, "weighted_stability": v} for i, v in enumerate(series)]
    summary = summarize(records, total_steps=2000, rule=PlateauRule(threshold=0.97, window=3, epsilon=0.002))
    assert summary["final_network_stability"] == 0.977 and summary["min_network_stability"] == 0.5
    assert summary["step_90pct_of_final"] == 400 and summary["fraction_90pct_of_final"] == 0.2
    assert summary["step_90pct_of_rise"] == 400 and summary["fraction_90pct_of_rise"] == 0.2      # >= 0.5 + 0.9·0.477
    assert summary["auto_switch_step"] == 800 and "0.9760 >= 0.97 and changed by 0.0010" in summary["auto_reason"]
    assert summarize(records, 2000)["auto_switch_step"] is None               # the defaults want 0.99


def test_stability_summary_reports_the_qr_mixing():
    from oialr.cli.stability_report import network_mixing, summarize
    layers = [{"a": {"mixing": None}, "b": {"mixing": None}}, {"a": {"mixing": 0.2}, "b": {"mixing": 0.4}},
              {"a": {"mixing": 0.05}, "b": {"mixing": None}}]
    records = [{"step": 50 * (i + 1), "network_stability": v, "weighted_stability": v, "layers": lay}
               for i, (v, lay) in enumerate(zip([None, 0.9, 0.99], layers))]
    assert network_mixing(records[0]) is None and network_mixing(records[1]) == pytest.approx(0.3)
    summary = summarize(records, total_steps=150)
    assert summary["final_network_mixing"] == 0.05
    assert summarize([{**r, "layers": {}} for r in records], 150)["final_network_mixing"] is None


def test_aggregate_table_gives_mean_and_std_over_seeds(tmp_path):
    from oialr.cli.compare import aggregate_table
    dirs = []
    for i, top1 in enumerate((0.80, 0.82, 0.84)):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"top1": top1, "trainable_params": 20 + i, "dense_params": 100,
                                                    "stored_params": 150, "train_seconds": 10.0 * (i + 1),
                                                    "peak_rss_mb": 500}))
        dirs.append(str(d))
    rows = aggregate_table({"three": dirs, "one": dirs[:1]}).splitlines()
    assert rows[2] == "| three | 3 | 82.00 ± 2.00 | 21.0 ± 1.0 | 150.0 ± 0.0 | — | 20 ± 10 | 500 ± 0 |"
    assert rows[3] == "| one | 1 | 80.00 | 20.0 | 150.0 | — | 10 | 500 |"
    rows = aggregate_table({"three": dirs, "one": dirs[:1]}, reference="one").splitlines()
    assert rows[0].endswith("| train s | time ÷ one | peak MB |")
    assert rows[2].endswith("| 20 ± 10 | 2.00 | 500 ± 0 |") and rows[3].endswith("| 10 | 1.00 | 500 |")
    with pytest.raises(ConfigError, match=r"reference group 'full-rank' has no finished run; groups: three, one"):
        aggregate_table({"three": dirs, "one": dirs[:1]}, reference="full-rank")


def test_a_growing_run_ends_within_its_budget(data_dir, tmp_path):
    oialr_settings = {"warmup_steps": 20, "update_every": 7, "cutoff": 0.0, "stored_budget": 0.5,
                      "augment_bases": True}
    run = start_or_resume(tiny(data_dir, oialr=oialr_settings), str(tmp_path / "g"), resume=False,
                          log=lambda *a: None)
    results = run.train()
    assert results["steps"] == 45 and (45 - 20) % 7                 # the last step is no update: layers widened
    assert results["stored_fraction"] == results["cut_stored_fraction"] <= 0.5
    assert {name: layer["rank"] for name, layer in results["layers"].items()} == run.controller.cut_ranks


def test_text_tables_give_the_factored_layers_stored_fraction(tmp_path):
    from oialr.cli.compare import aggregate_table, factored_stored_fraction
    layers = {"a": {"rank": 2, "full_rank": 4, "dense_params": 16, "stored_params": 2 * (4 + 4 + 2)},
              "b": {"rank": 8, "full_rank": 8, "dense_params": 64, "stored_params": 8 * (8 + 8 + 8)}}
    base = {"val_bpb": 2.5, "trainable_params": 50, "dense_params": 100, "stored_params": 120, "train_seconds": 9.0,
            "peak_rss_mb": 400, "tokens_per_second_full_rank": 1000.0, "tokens_per_second_low_rank": None}
    lowrank = {**base, "transition_step": 3, "layers": layers}
    assert factored_stored_fraction(lowrank) == (20 + 192) / (16 + 64)
    assert factored_stored_fraction({**lowrank, "transition_step": None}) is None      # still in warm-up
    assert factored_stored_fraction({**base, "transition_step": None, "layers": {}}) is None      # full-rank
    for name, results in (("lr", lowrank), ("fr", {**base, "transition_step": None, "layers": {}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    rows = aggregate_table({"lr": [str(tmp_path / "lr")], "fr": [str(tmp_path / "fr")]}).splitlines()
    assert rows[0].split(" | ")[5] == "factored stored %"
    assert rows[2] == "| lr | 1 | 2.5000 | 50.0 | 120.0 | 265.0 | 1,000 | — | 9 | 400 |"
    assert rows[3] == "| fr | 1 | 2.5000 | 50.0 | 120.0 | — | 1,000 | — | 9 | 400 |"


def test_automatic_transition_reads_the_runs_stability_series(data_dir, tmp_path):
    auto = {"warmup_steps": "auto", "update_every": 7, "cutoff": 0.2,
            "auto": {"every": 5, "min_steps": 5, "max_steps": 10}}
    run = start_or_resume(tiny(data_dir, epochs=1, stability_every=5, oialr=auto), str(tmp_path / "a"),
                                  False, log=lambda *a: None)
    assert run.controller.tracker is run.tracker                   # one tracker measures the layers, not two
    run.train()
    assert run.controller.transition_step is not None and run.controller.transition_step % 5 == 0
    with pytest.raises(ConfigError, match=r"stability_every/stability_lag \(4/1\) must equal oialr.auto.every/lag "
                                          r"\(5/1\)"):
        tiny(data_dir, stability_every=4, oialr=auto)
