"""benchmarks/e2e_bound.py: the multiply-add ratio of finished runs, epoch by epoch, from their logged ranks."""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bound(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import e2e_bound
    return e2e_bound


def write_run(folder, method, top1, transition, epochs, model="mlp", dataset="mnist1d"):
    """A run folder of the CLI's mlp on MNIST-1D, batch 8, 10 steps per epoch; ``epochs`` lists each epoch's ranks."""
    os.makedirs(folder)
    config = {"dataset": dataset, "model": model, "model_args": {}, "batch_size": 8}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"method": method, "model": model, "top1": top1, "transition_step": transition,
                   "trainable_params": 50, "dense_params": 100, "config": config}, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for i, ranks in enumerate(epochs):
            f.write(json.dumps({"epoch": i + 1, "step": 10 * (i + 1), "ranks": ranks}) + "\n")
    return str(folder)


def test_epoch_ratios_price_warmup_steps_dense_and_the_rest_at_the_logged_ranks(bound, tmp_path):
    from flops import training_macs

    from oialr.layers import forward_path
    full = write_run(tmp_path / "full", "full-rank", 0.9, None, [{}, {}])
    run = write_run(tmp_path / "oialr", "oialr", 0.85, 4, [{"1": 40, "3": 16}, {"1": 40, "3": 8}])
    results, epochs = bound.load_results(run), bound.load_epochs(run)
    model = bound.flop_model(results)

    def layer(m, n, r):
        return training_macs(8, m, n, r, forward_path(8, m, n, r))

    head = training_macs(8, 10, 256, 10, "full")
    dense = training_macs(8, 256, 40, 40, "full") + training_macs(8, 256, 256, 256, "full") + head
    low1 = (layer(256, 40, 40) + layer(256, 256, 16) + head) / dense
    low2 = (layer(256, 40, 40) + layer(256, 256, 8) + head) / dense
    ratios = bound.epoch_ratios(results, epochs, model)
    assert ratios == pytest.approx([(4 + 6 * low1) / 10, low2])
    assert bound.run_bound(epochs, ratios) == pytest.approx(((4 + 6 * low1) / 10 + low2) / 2)
    assert low2 < low1 < 1
    assert bound.epoch_ratios(bound.load_results(full), bound.load_epochs(full), model) == [1.0, 1.0]


def test_run_that_never_switched_counts_every_step_full_rank(bound, tmp_path):
    run = write_run(tmp_path / "oialr", "oialr", 0.9, None, [{"1": 40, "3": 256}])
    results = bound.load_results(run)
    assert bound.epoch_ratios(results, bound.load_epochs(run), bound.flop_model(results)) == [1.0]


def test_table_and_out_file(bound, tmp_path):
    full = write_run(tmp_path / "full", "full-rank", 0.9, None, [{}])
    run = write_run(tmp_path / "oialr", "oialr", 0.885, 0, [{"1": 40, "3": 16}])
    out = tmp_path / "bound.md"
    bound.main(["--group", full, run, "--out", str(out)])
    page = out.read_text()
    assert f"e2e_bound.py --group {full} {run} --out {out}\n" in page
    rows = [line for line in page.splitlines() if line.startswith("|")]
    assert len(rows) == 3
    cells = [c.strip() for c in rows[2].split("|")[1:-1]]
    assert cells[:4] == [run, "88.50", "-1.50", "50.0"]
    assert float(cells[4]) == float(cells[5]) < 1


def test_errors_name_the_problem(bound, tmp_path):
    full = write_run(tmp_path / "full", "full-rank", 0.9, None, [{}])
    run = write_run(tmp_path / "oialr", "oialr", 0.9, 0, [{"1": 40, "7": 8}])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a finished run folder: missing .*results.json"):
        bound.load_results(str(tmp_path / "empty"))
    os.remove(os.path.join(full, "metrics.jsonl"))
    bound.table([[full]])                                   # the full-rank run needs only its results.json
    with pytest.raises(FileNotFoundError, match="has no per-epoch log: missing .*metrics.jsonl"):
        bound.load_epochs(full)
    with pytest.raises(ValueError, match="starts with the full-rank run; .* is method 'oialr'"):
        bound.table([[run, full]])
    with pytest.raises(KeyError, match=r"layers this model does not have: \['7'\]"):
        bound.table([[full, run]])
    cnn = write_run(tmp_path / "cnn", "oialr", 0.9, 0, [{}], model="cnn")
    with pytest.raises(ValueError, match="cnn trains 'cnn', its full-rank run .*full trains 'mlp'"):
        bound.table([[full, cnn]])
    cifar = write_run(tmp_path / "cifar", "oialr", 0.9, 0, [{}], dataset="cifar10")
    with pytest.raises(ValueError, match="dataset 'cifar10' has no known input shape"):
        bound.table([[full, cifar]])
