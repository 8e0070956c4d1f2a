"""benchmarks/experiments.py: run selection, parallel workers, archiving of finished runs, reports (with a stand-in
for ``oialr train`` that writes a results.json)."""
import importlib.util
import json
import os
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_TRAIN = textwrap.dedent("""\
    import json, os, sys, time
    args = sys.argv[2:]
    out = args[args.index("--out") + 1]
    with open(os.path.join(os.path.dirname(out), "calls.txt"), "a") as f:
        f.write(" ".join(args) + "\\n")
    time.sleep(0.3)
    if "fail" in out:
        sys.exit(3)
    os.makedirs(out, exist_ok=True)
    seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 0
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"method": "oialr", "model": "mlp", "top1": 0.5 + seed / 10, "best_top1": 0.9, "dense_params": 100,
                   "trainable_params": 20, "stored_params": 50, "train_seconds": 1.0, "peak_rss_mb": 10.0}, f)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write('{"epoch": 1}\\n')
""")


@pytest.fixture
def experiments(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))         # its sibling grid_plots
    spec = importlib.util.spec_from_file_location("experiments", os.path.join(ROOT, "benchmarks", "experiments.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "experiments", module)        # its dataclass looks itself up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", str(tmp_path))
    fake = tmp_path / "fake_oialr.py"
    fake.write_text(FAKE_TRAIN)
    real = module.Run.command                                        # the same arguments, to the stand-in
    monkeypatch.setattr(module.Run, "command",
                        lambda self, oialr, threads: [sys.executable, str(fake)] + real(self, oialr, threads)[1:])
    return module


def write_grid(tmp_path, name, groups, seeds=(0, 1)):
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"base": "base.yaml", "out": f"runs/{name}", "report": f"docs/{name}.md",
                                "seeds": list(seeds), "groups": groups}))
    return str(path)


def calls(tmp_path, name):
    path = tmp_path / "runs" / name / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_runs_in_parallel_archive_and_are_not_trained_again(experiments, tmp_path):
    grid = write_grid(tmp_path, "g", {"a": {"method": "oialr", "oialr": {"cutoff": 0.3}}, "b": {"method": "full-rank"}})
    experiments.main([grid, "--workers", "2", "--threads", "1"])
    made = calls(tmp_path, "g")
    assert len(made) == 4
    assert "--out runs/g/a-s0 --config base.yaml --seed 0 --set method=\"oialr\" --set oialr.cutoff=0.3 " \
           "--set threads=1" in made
    for name in ("a-s0", "b-s0", "a-s1", "b-s1"):
        assert json.loads((tmp_path / "docs" / "g" / name / "results.json").read_text())["trainable_params"] == 20
        assert (tmp_path / "docs" / "g" / name / "metrics.jsonl").exists()
    report = (tmp_path / "docs" / "g.md").read_text()
    assert "| a | 2 | 55.00 ± 7.07 | 20.0 ± 0.0 |" in report
    # a new machine: the run folders are gone, the archive in docs/ keeps the runs finished and in the report
    for name in ("a-s0", "b-s0", "a-s1", "b-s1"):
        os.remove(tmp_path / "runs" / "g" / name / "results.json")
    experiments.main([grid])
    assert len(calls(tmp_path, "g")) == 4
    assert "| a | 2 | 55.00 ± 7.07 |" in (tmp_path / "docs" / "g.md").read_text()


def test_only_runs_the_named_runs_in_order_and_qualifies_ambiguous_names(experiments, tmp_path):
    g1 = write_grid(tmp_path, "g1", {"a": {}, "b": {}})
    g2 = write_grid(tmp_path, "g2", {"a": {}})
    with pytest.raises(SystemExit, match="--only a-s0: matches g1/a-s0 and g2/a-s0"):
        experiments.main([g1, g2, "--only", "a-s0"])
    with pytest.raises(SystemExit, match="--only c-s0: is no run of these grids"):
        experiments.main([g1, g2, "--only", "c-s0"])
    experiments.main([g1, g2, "--only", "b-s1", "--only", "g2/a-s0"])
    assert [c.split()[1] for c in calls(tmp_path, "g1")] == ["runs/g1/b-s1"]
    assert [c.split()[1] for c in calls(tmp_path, "g2")] == ["runs/g2/a-s0"]


def test_a_failed_run_stops_new_ones_and_an_interrupted_one_is_resumed(experiments, tmp_path):
    grid = write_grid(tmp_path, "g", {"fail": {}, "ok": {}}, seeds=(0,))
    (tmp_path / "runs" / "g" / "ok-s0").mkdir(parents=True)
    (tmp_path / "runs" / "g" / "ok-s0" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"stopped: runs/g/fail-s0 \(exit code 3; its output: runs/g/fail-s0.log\)"):
        experiments.main([grid])
    assert len(calls(tmp_path, "g")) == 1                   # ok-s0 never started
    experiments.main([grid, "--only", "ok-s0"])
    assert calls(tmp_path, "g")[-1] == "--out runs/g/ok-s0 --resume"


def test_runs_finished_elsewhere_are_archived(experiments, tmp_path):
    grid = write_grid(tmp_path, "g", {"a": {}}, seeds=(0,))
    out = tmp_path / "runs" / "g" / "a-s0"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({
        "method": "oialr", "model": "mlp", "top1": 0.7, "best_top1": 0.7, "dense_params": 10, "trainable_params": 5,
        "stored_params": 10, "train_seconds": 2.0, "peak_rss_mb": 1.0}))
    experiments.main([grid, "--report"])
    assert (tmp_path / "docs" / "g" / "a-s0" / "results.json").exists()
    assert "| a-s0 | oialr | mlp | 0.7000 |" in (tmp_path / "docs" / "g.md").read_text()


def test_a_text_grid_page_gets_its_two_figures(experiments, tmp_path):
    grid = write_grid(tmp_path, "lm", {"full-rank": {"method": "full-rank"}, "oialr": {"method": "oialr"}}, seeds=[0])
    for name, transition in (("full-rank-s0", None), ("oialr-s0", 5)):
        run = tmp_path / "docs" / "lm" / name
        run.mkdir(parents=True)
        layer = {"rank": 2, "full_rank": 8, "dense_params": 64, "stored_params": 36}
        (run / "results.json").write_text(json.dumps({
            "method": name[:-3], "val_bpb": 2.5, "best_val_bpb": 2.5, "val_loss": 1.7, "trainable_params": 10,
            "dense_params": 100, "stored_params": 50, "train_seconds": 3.0, "peak_rss_mb": 10.0,
            "transition_step": transition, "layers": {} if transition is None else {"l": layer}}))
        (run / "metrics.jsonl").write_text(
            "".join(json.dumps({"train_seconds": t, "val_bpb": 3.0 - t / 10}) + "\n" for t in (1.0, 2.0, 3.0)))
    experiments.main([grid, "--report"])
    report = (tmp_path / "docs" / "lm.md").read_text()
    assert "![validation bpb against training seconds](lm/bpb_vs_time.png)" in report
    for figure in ("bpb_vs_time.png", "bpb_vs_stored.png"):
        assert (tmp_path / "docs" / "lm" / figure).stat().st_size > 1000
    assert "| oialr | 1 | 2.5000 | 10.0 | 50.0 | 56.2 |" in report              # 36 of 64 in the factored layer
