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


def fake_vision_run(tmp_path, grid, name, top1, stored=None, layers=True):
    """An archived vision run: ``stored`` parameters of a 100-parameter factored layer (None: no factored layer);
    ``layers=False``: a factored run whose results.json lacks per-layer sizes (one rebuilt from a table)."""
    run = tmp_path / "docs" / grid / name
    run.mkdir(parents=True)
    layer = {"rank": 2, "full_rank": 10, "dense_params": 100, "stored_params": stored}
    (run / "results.json").write_text(json.dumps({
        "method": "full-rank" if stored is None else "oialr", "model": "vit", "top1": top1, "best_top1": top1,
        "dense_params": 200, "trainable_params": 50, "stored_params": 150, "train_seconds": 9.0, "peak_rss_mb": 1.0,
        "transition_step": None if stored is None else 4,
        "layers": {"l": layer} if stored is not None and layers else {}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train_seconds": 3.0 * e,
                                                           "test_top1": top1 - 0.1 / e}) + "\n" for e in (1, 2, 3)))
    return str(run)


def test_the_frontier_draws_curves_through_group_means_points_and_levels(experiments, tmp_path):
    plots = experiments.grid_plots
    groups = {"c0.3": [fake_vision_run(tmp_path, "g", "c0.3-s0", 0.80, stored=20),
                       fake_vision_run(tmp_path, "g", "c0.3-s1", 0.82, stored=30)],
              "c0.1": [fake_vision_run(tmp_path, "g", "c0.1-s0", 0.84, stored=60),
                       fake_vision_run(tmp_path, "g", "c0.1-s1", 0.85, stored=60, layers=False)],
              "b0.5": [fake_vision_run(tmp_path, "g", "b0.5-s0", 0.83, stored=50)],
              "full-rank": [fake_vision_run(tmp_path, "g", "full-rank-s0", 0.86),
                            fake_vision_run(tmp_path, "g", "full-rank-s1", 0.88)]}
    metric = plots.metric_of([json.loads((tmp_path / "docs" / "g" / "c0.3-s0" / "results.json").read_text())])
    assert metric is plots.TOP1
    points, left_out = plots.metric_by_stored(groups, metric)
    assert left_out == ["c0.1-s1 (no per-layer sizes in results.json)"]
    front = plots.frontier(points, {"cutoff sweep": ["c0.1", "c0.3"]})
    (line,) = front.lines.values()
    assert [p.group for p in line] == ["c0.3", "c0.1"]                   # by stored fraction, not as listed
    assert line[0].stored == pytest.approx(25.0) and line[0].value == pytest.approx(81.0)
    assert (line[0].stored_std, line[0].value_std) == (pytest.approx(7.0711, abs=1e-4), pytest.approx(1.4142, abs=1e-4))
    assert (line[1].stored, line[1].value, line[1].value_std) == (pytest.approx(60.0), pytest.approx(84.0), None)
    assert [(p.group, p.stored, p.value) for p in front.points] == [("b0.5", 50.0, pytest.approx(83.0))]
    assert front.levels == {"full-rank": pytest.approx(87.0)}
    paths = plots.render(metric, plots.metric_curves(groups, metric)[0], front, str(tmp_path / "figures"))
    assert [os.path.basename(p) for p in paths] == ["top1_vs_time.png", "top1_vs_stored.png"]


def test_a_grid_borrows_runs_another_grid_trains(experiments, tmp_path):
    write_grid(tmp_path, "other", {"dense": {"method": "full-rank"}, "c0.2": {"method": "oialr"}}, seeds=[0, 1])
    fake_vision_run(tmp_path, "other", "dense-s0", 0.90)
    out = tmp_path / "runs" / "other" / "c0.2-s0"                     # finished, not yet archived
    out.mkdir(parents=True)
    (out / "results.json").write_text((tmp_path / "docs" / "other" / "dense-s0" / "results.json").read_text()
                                      .replace('"top1": 0.9', '"top1": 0.7'))
    grid = write_grid(tmp_path, "g", {"b0.5": {"method": "oialr", "oialr": {"stored_budget": 0.5}}}, seeds=[0, 1])
    spec = json.loads(open(grid).read())
    spec.update(borrow={"full-rank": "other/dense", "c0.2": "other/c0.2"}, curves={"budget": ["b0.5"]},
                reference="full-rank")
    open(grid, "w").write(json.dumps(spec))
    with pytest.raises(SystemExit, match=r"--only full-rank-s1: g borrows full-rank from other/dense, which trains "
                                         r"it: .venv/bin/python benchmarks/experiments.py other.yaml --only dense-s1"):
        experiments.main([grid, "--only", "full-rank-s1"])
    experiments.main([grid, "--workers", "2"])
    assert sorted(c.split()[1] for c in calls(tmp_path, "g")) == ["runs/g/b0.5-s0", "runs/g/b0.5-s1"]
    assert calls(tmp_path, "other") == []
    assert not (tmp_path / "docs" / "g" / "full-rank-s0").exists()   # read where it is, not copied
    report = (tmp_path / "docs" / "g.md").read_text()
    assert "| full-rank | 1 | 90.00 |" in report and "| c0.2 | 1 | 70.00 |" in report
    assert "| b0.5 | 2 | 55.00 ± 7.07 |" in report
    assert "| train s | time ÷ full-rank | peak MB |" in report            # whole-run time against the reference
    assert "- `full-rank`: borrowed from `other/dense` (trained by `other.yaml`; not finished for seed 1): " \
           "`method=\"full-rank\"`" in report
    assert "![test top-1 against stored parameters](g/top1_vs_stored.png)" in report
    assert (tmp_path / "docs" / "g" / "top1_vs_stored.png").stat().st_size > 1000


def test_bad_borrow_and_curves_are_clear_errors(experiments, tmp_path):
    write_grid(tmp_path, "other", {"dense": {}, "c0.2": {}})

    def grid_with(**keys):
        path = write_grid(tmp_path, "g", {"a": {}})
        spec = json.loads(open(path).read())
        open(path, "w").write(json.dumps({**spec, **keys}))
        return path

    for borrow, problem in (({"d": "dense"}, r"d: 'dense' is not OTHER_GRID/GROUP"),
                            ({"d": "nope/dense"}, r"d: no grid nope \(.*nope.yaml does not exist\); the grids: g, "
                                                  r"other"),
                            ({"d": "other/sparse"}, r"d: grid other trains no group sparse; its groups: dense, c0.2"),
                            ({"a": "other/dense"}, r"a is also a group trained by this grid")):
        with pytest.raises(SystemExit, match=r"g.yaml: borrow: " + problem):
            experiments.main([grid_with(borrow=borrow), "--report"])
    with pytest.raises(SystemExit, match=r"g.yaml: curves: cutoff sweep: no group 'c0.3' in this grid; its groups: "
                                         r"d, a"):
        experiments.main([grid_with(borrow={"d": "other/dense"}, curves={"cutoff sweep": ["a", "c0.3"]}), "--report"])
    with pytest.raises(SystemExit, match=r"g.yaml: reference: no group 'full-rank' in this grid; its groups: a"):
        experiments.main([grid_with(reference="full-rank"), "--report"])
