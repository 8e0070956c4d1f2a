"""The text workload: the corpus and its split, the window loader, the Llama model, `oialr train --dataset text`
with every method on a tiny model (results, metrics, resume), and the errors for a bad --data-dir."""
import json
import os

import pytest
import torch

from interrupt import interrupt_after
from oialr import from_pretrained
from oialr.cli.interrupts import Interrupted
from oialr.cli.start import start_or_resume
from oialr.cli import text_data
from oialr.cli.data import DataError
from oialr.cli.main import main
from oialr.cli.models import build_model
from oialr.cli.settings import ConfigError, build_config
from oialr.cli.text_data import TextLoader, load_text, split_bytes

pytest.importorskip("transformers")

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of two fortune-style files (entries between "%" lines), about 6 kB."""
    folder = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        entries = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (8,), generator=g)) for _ in range(80)]
        (folder / name).write_text("\n%\n".join(entries) + "\n%\n")
    return str(folder)


def tiny(corpus, **extra):
    values = {"dataset": "text", "model": "llama", "data_dir": corpus, "context_length": 16, "batch_size": 8,
              "epochs": 2, "eval_every": 20, "threads": 1, "label_smoothing": 0.0, "rank": 0.5,
              "model_args": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "intermediate_size": 32},
              "oialr": {"warmup_steps": 10, "update_every": 8, "cutoff": 0.2}, "galore_update_proj_gap": 6}
    values.update(extra)
    return build_config(values)


def test_corpus_split_is_fixed_and_drops_fortune_separators(corpus, tmp_path):
    data = load_text(corpus, context_length=16)
    again = load_text(corpus, context_length=16)
    assert torch.equal(data.train, again.train) and torch.equal(data.val, again.val) and data.sha256 == again.sha256
    text = bytes(data.train.tolist()) + bytes(data.val.tolist())
    assert b"%" not in text and b"\n\n" in text                     # entries separated by a blank line
    assert 0.03 < len(data.val) / len(text) < 0.08 and data.files == 2
    assert data.input_shape == (16,) and data.num_classes == 256
    # binary files (NUL bytes), hidden files and a second path to a file are skipped
    (tmp_path / "one.txt").write_text("hello world\n" * 40)
    (tmp_path / "index.dat").write_bytes(b"\0\1\2" * 100)
    (tmp_path / ".hidden").write_text("secret\n" * 40)
    os.symlink(tmp_path / "one.txt", tmp_path / "one.u8")
    assert load_text(str(tmp_path), 4).files == 1
    assert load_text(str(tmp_path / "one.txt"), 4).files == 1


def test_split_cuts_at_a_blank_line_after_the_fraction():
    assert split_bytes(b"aaaa\n\nbbbb\n\ncc\n", 0.5) == (b"aaaa\n\nbbbb\n\n", b"cc\n")
    assert split_bytes(b"aaaa\nbbbb\ncc", 0.5) == (b"aaaa\nbbbb\n", b"cc")
    assert split_bytes(b"abcdefghij", 0.2) == (b"abcdefgh", b"ij")


def test_loader_windows_are_next_byte_pairs_covering_the_split():
    tokens = torch.arange(200, dtype=torch.uint8)
    train = TextLoader(tokens, 10, 4, shuffle=True, seed=3)
    assert train.windows == 19 and len(train) == 4
    train.set_epoch(1)
    batches = list(train)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 10)] * 4 and batches[0][0].dtype == torch.int64
    for x, y in batches:
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    starts = sorted(int(x[i, 0]) for x, _ in batches for i in range(len(x)))
    assert len(set(s % 10 for s in starts)) == 1                            # one offset per epoch
    assert [torch.equal(a[0], b[0]) for a, b in zip(batches, list(train))] == [True] * 4   # deterministic
    val = TextLoader(tokens, 10, 8, shuffle=False)
    assert val.windows == 19 and len(val) == 3 and sum(len(x) for x, _ in val) == 19
    shards = [TextLoader(tokens, 10, 4, shuffle=True, rank=r, world_size=2) for r in (0, 1)]
    firsts = [set(int(x[i, 0]) for x, _ in s for i in range(len(x))) for s in shards]
    assert not firsts[0] & firsts[1]


def test_llama_model_from_config_and_its_errors():
    model = build_model("llama", (16,), 256, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    assert model(torch.randint(256, (3, 16))).shape == (3, 16, 256)
    with pytest.raises(ValueError, match="has no option.*width"):
        build_model("llama", (16,), 256, width=3)
    with pytest.raises(ValueError, match="divisible by num_attention_heads=3"):
        build_model("llama", (16,), 256, hidden_size=16, num_attention_heads=3)
    with pytest.raises(ConfigError, match="dataset 'text' and model 'llama' go together"):
        build_config({"dataset": "text", "model": "cnn"})


@pytest.mark.parametrize("method", ["full-rank", "oialr", "factorized", "svd-finetune", "galore"])
def test_train_text_with_every_method(method, corpus, tmp_path, capsys):
    if method == "galore":
        pytest.importorskip("galore_torch")
    out = str(tmp_path / method)
    args = ["train", "--dataset", "text", "--model", "llama", "--method", method, "--data-dir", corpus,
            "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--out", out]
    settings = {k: v for k, v in tiny(corpus).to_dict().items()
                if k in ("context_length", "eval_every", "threads", "label_smoothing", "rank",
                         "galore_update_proj_gap")}
    args += [arg for k, v in settings.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    args += [arg for k, v in tiny(corpus).model_args.items() for arg in ("--set", f"model_args.{k}={v}")]
    args += ["--set", "oialr.warmup_steps=10", "--set", "oialr.update_every=8", "--set", "oialr.cutoff=0.2"]
    assert main(args) == 0
    results = json.load(open(os.path.join(out, "results.json")))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps_per_epoch = results["steps"] // 2
    assert results["method"] == method and results["val_bpb"] == pytest.approx(results["val_loss"] / 0.6931471805599453)
    assert results["val_bpb"] < 8.0 and results["best_val_bpb"] <= rows[0]["val_bpb"]       # it learned
    assert [r["step"] for r in rows] == sorted({*range(20, results["steps"], 20), steps_per_epoch, results["steps"]})
    assert {"val_loss", "val_bpb", "tokens_per_second_full_rank", "tokens_per_second_low_rank"} <= set(rows[-1])
    low_rank = method in ("oialr", "factorized", "svd-finetune")
    assert (results["tokens_per_second_low_rank"] is not None) == low_rank
    assert (results["tokens_per_second_full_rank"] is not None) == (method != "factorized")
    assert (results["trainable_params"] < results["dense_params"]) == low_rank
    assert results["transition_step"] == {"oialr": 10, "svd-finetune": 10, "factorized": 0}.get(method)
    if method in ("factorized", "svd-finetune"):
        assert {layer["rank"] for layer in results["layers"].values()} == {8}    # 0.5 · 16, every projection
        assert "lm.lm_head" not in results["layers"] and len(results["layers"]) == 7
    model_args = results["config"]["model_args"]
    exported = from_pretrained(build_model("llama", (results["config"]["context_length"],), 256, **model_args),
                               os.path.join(out, "compact"))
    assert not any(type(m).__module__.startswith("oialr.") and "models" not in type(m).__module__
                   for m in exported.modules())
    from_pretrained(build_model("llama", (results["config"]["context_length"],), 256, **model_args),
                    os.path.join(out, "model"))
    torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    capsys.readouterr()
    assert main(["compare", out]) == 0
    table = capsys.readouterr().out
    assert "val bpb" in table and "tok/s low-rank" in table and f"{results['val_bpb']:.4f}" in table


@pytest.mark.parametrize("method", ["svd-finetune", "galore"])
def test_text_run_resumes_exactly(method, corpus, tmp_path, monkeypatch):
    """Interrupted after the truncation (svd-finetune) or after a projector refresh (galore), then resumed: the same
    losses and weights as the run that never stopped."""
    if method == "galore":
        pytest.importorskip("galore_torch")
    cfg = tiny(corpus, method=method, epochs=1)
    straight = start_or_resume(cfg, str(tmp_path / "a"), False, log=lambda *a: None)
    straight.train()
    with monkeypatch.context() as m:
        interrupt_after(m, 13)
        run = start_or_resume(cfg, str(tmp_path / "b"), False, log=lambda *a: None)
        with pytest.raises(Interrupted, match="at step 13"):
            run.train()
    resumed = start_or_resume(None, str(tmp_path / "b"), True, log=lambda *a: None)
    resumed.train()
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in resumed.metrics] == pytest.approx([r[key] for r in straight.metrics], abs=1e-12)
    for (k1, v1), (k2, v2) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def _one_error_line(capsys, args):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_bad_data_dir_is_one_clear_line(tmp_path, capsys, monkeypatch):
    base = ["train", "--dataset", "text", "--model", "llama", "--out", str(tmp_path / "r"), "--data-dir"]
    err = _one_error_line(capsys, base + [str(tmp_path / "nope")])
    assert "text data not found" in err and "apt-get install fortunes" in err
    (tmp_path / "empty").mkdir()
    assert "holds no files" in _one_error_line(capsys, base + [str(tmp_path / "empty")])
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    assert "holds no text" in _one_error_line(capsys, base + [str(tmp_path / "blank.txt")])
    (tmp_path / "short.txt").write_text("too short for a window\n")
    assert "fewer than one window" in _one_error_line(capsys, base + [str(tmp_path / "short.txt")])

    def unreadable(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(text_data, "open", unreadable, raising=False)       # root reads any file: fake the refusal
    err = _one_error_line(capsys, base + [str(tmp_path / "short.txt")])
    assert "cannot be read (Permission denied)" in err and "short.txt" in err
    with pytest.raises(DataError):
        load_text(str(tmp_path / "short.txt"))
