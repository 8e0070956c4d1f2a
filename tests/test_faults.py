"""Fault injection: kills, signals, stopped and dead peers, full and read-only disks, concurrent runs, corrupt files.
Whatever happens, a run either ends with one line that says what is wrong (and keeps its last checkpoint) or resumes
to exactly the numbers of a run that was never disturbed."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from oialr import OIALR, DegenerateStateError, OIALRConfig
from oialr.cli import run as cli_run
from oialr.cli.interrupts import Interrupted
from oialr.cli.start import start_or_resume
from oialr.cli import run_folder
from oialr.cli.main import main
from oialr.cli.settings import ConfigError, build_config
from full_disk import fill_disk

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(HERE, "..", "src"), HERE])}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An MNIST-1D cache folder, filled once so that no two processes generate it at the same time."""
    from oialr.cli.data import load_dataset
    path = str(tmp_path_factory.mktemp("mnist1d"))
    load_dataset("mnist1d", path)
    return path


def args(data_dir, out, *extra):
    """A tiny run: 15 steps per epoch (batch 256 of 4,000 samples), transition at step 20, updates every 7."""
    return ["train", "--dataset", "mnist1d", "--data-dir", data_dir, "--model", "mlp", "--batch-size", "256",
            "--out", str(out), "--set", "model_args.width=16", "--set", "threads=1", "--set", "oialr.warmup_steps=20",
            "--set", "oialr.update_every=7", *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def same_numbers(rows_a, rows_b) -> None:
    """Every logged metric equal (exactly), but the wall-clock time."""
    strip = [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows_b]


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def checkpoint_step(out) -> int:
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"]


# ---------------------------------------------------------------------------------------- refused before any work
def test_a_batch_larger_than_the_training_split_is_refused_before_any_work(data_dir, tmp_path, capsys):
    assert main(args(data_dir, tmp_path / "r", "--epochs", "1", "--set", "batch_size=5000")) == 2
    assert one_line_error(capsys) == ("oialr: error: the training split has 4000 samples per process, fewer than one "
                                      "batch of 5000; use a smaller batch_size")
    assert os.listdir(tmp_path / "r") == []                 # the claim was given back, nothing written


def test_unknown_or_ill_typed_model_args_are_refused_with_the_accepted_ones(data_dir, tmp_path, capsys):
    assert main(args(data_dir, tmp_path / "r", "--set", "model_args.widht=16")) == 2
    assert one_line_error(capsys) == ("oialr: error: model 'mlp' has no option(s) widht; accepted: width (int, "
                                      "default 256), depth (int, default 2)")
    assert main(args(data_dir, tmp_path / "r", "--set", "model_args.width=wide", "--set", "model_args.depth=0")) == 2
    assert one_line_error(capsys) == ("oialr: error: model_args.width must be an integer >= 1, got 'wide'; "
                                      "model_args.depth must be an integer >= 1, got 0")
    assert os.listdir(tmp_path / "r") == []


def test_dist_timeout_is_a_positive_number_of_seconds():
    with pytest.raises(ConfigError, match=r"dist_timeout must be a number in \(0, 86400\), got 0"):
        build_config(None, ["dist_timeout=0"])
    assert build_config(None, ["dist_timeout=2.5"]).dist_timeout == 2.5


def test_an_impossible_or_read_only_out_is_refused_before_any_work(data_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert main(args(data_dir, tmp_path / "file" / "run")) == 2
    assert one_line_error(capsys) == (f"oialr: error: --out {tmp_path}/file/run cannot hold a run: Not a directory "
                                      f"({tmp_path}/file/run); choose a folder you can write to")

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(run_folder, "open", read_only, raising=False)     # a read-only mount, even for root
    assert main(args(data_dir, tmp_path / "ro")) == 2
    assert "cannot hold a run: Read-only file system" in one_line_error(capsys)


def test_a_second_run_on_a_claimed_folder_is_refused_at_once(data_dir, tmp_path, capsys):
    out = str(tmp_path / "busy")
    claim = run_folder.RunFolder(out).claim()                # as another oialr train would hold it
    try:
        assert main(args(data_dir, out)) == 2
        assert one_line_error(capsys) == (f"oialr: error: {out} is in use by another oialr train (pid {os.getpid()} "
                                          f"on {os.uname().nodename}); wait for it to end or choose another --out")
    finally:
        claim.release()
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------- late failures: one line
@pytest.mark.parametrize("method, message", [
    ("oialr", "OIALR basis update at step 27 refused: '1' (Σ: 64 NaN); '3' (Σ: 9 NaN). Nothing was changed; "),
    ("full-rank", "training diverged: train loss nan at epoch 2 (step 30); the state was not saved; lower the "
                  "learning rate or set grad_clip (the last checkpoint in ")])
def test_a_diverged_run_ends_in_one_line_and_keeps_its_last_good_checkpoint(data_dir, tmp_path, capsys, method,
                                                                            message):
    out = tmp_path / "lr"
    assert main(args(data_dir, out, "--epochs", "3", "--lr", "1000", "--method", method)) == 1
    assert one_line_error(capsys).startswith("oialr: error: " + message)
    assert checkpoint_step(out) == 15 and not os.path.exists(out / run_folder.LOCK)


def test_a_nan_weight_at_the_transition_ends_in_one_line_and_keeps_the_checkpoint(data_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    real = cli_run.TrainingRun._train_step

    def step(self, x, y):
        def poison(*_):                                     # after the optimizer step, before the transition
            with torch.no_grad():
                self.model[3].weight[0, 0] = float("nan")

        if self.step == 19:
            self.optimizer.register_step_post_hook(poison)
        real(self, x, y)

    monkeypatch.setattr(cli_run.TrainingRun, "_train_step", step)
    out = tmp_path / "nan"
    assert main(args(data_dir, out, "--epochs", "2")) == 1
    assert one_line_error(capsys).startswith("oialr: error: OIALR transition at step 20 refused: '3' (W: 1 NaN). "
                                             "Nothing was changed; ")
    assert checkpoint_step(out) == 15


def test_a_full_disk_ends_in_one_line_and_keeps_the_previous_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "full"
    fill_disk(monkeypatch, lambda: os.path.exists(out / "checkpoint.pt"))     # full after the first checkpoint
    assert main(args(data_dir, out, "--epochs", "2")) == 1
    assert one_line_error(capsys) == (
        f"oialr: error: cannot write {out}/metrics.jsonl: No space left on device; its previous version is "
        f"unchanged; free some space or fix the permissions of {out}, then continue with --resume")
    monkeypatch.undo()
    assert checkpoint_step(out) == 15 and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert main(args(data_dir, out, "--epochs", "2", "--resume")) == 0


@pytest.mark.parametrize("content, found", [
    (b"PK\x03\x04 not really a zip", "is not a checkpoint written by oialr train (RuntimeError: "),
    ({"weights": [1, 2]}, "is not a checkpoint written by oialr train (it lacks config, epoch, batch_in_epoch, "
                          "step, train_seconds, metrics, controller, model, optimizer, rng)")])
def test_a_corrupt_or_foreign_checkpoint_is_refused_in_one_line(data_dir, tmp_path, capsys, content, found):
    out = tmp_path / "foreign"
    out.mkdir()
    if isinstance(content, bytes):
        (out / "checkpoint.pt").write_bytes(content)
    else:
        torch.save(content, out / "checkpoint.pt")
    assert main(args(data_dir, out, "--resume")) == 2
    assert one_line_error(capsys).startswith(f"oialr: error: {out}/checkpoint.pt {found}")


def test_resume_lists_only_the_settings_the_user_gave(data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(args(data_dir, out, "--epochs", "2", "--set", "oialr.cutoff=0.3")) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--set", "dist_timeout=60"]) == 2
    assert capsys.readouterr().err == ("oialr: error: --resume continues the saved run; its settings differ from the "
                                       "ones given:\n  epochs: saved 2, given 3\n")
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--set", "oialr.cutoff=0.3",
                 "--set", "dist_timeout=60"]) == 0                  # a launch setting: not compared


def test_orphan_temporary_files_are_removed_when_a_run_claims_its_folder(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    for name in (".checkpoint.pt.a1b2c3d4.tmp", ".metrics.jsonl.zz_9xy01.tmp", "keep.tmp", ".keep"):
        (out / name).write_text("x")
    claim = run_folder.RunFolder(str(out)).claim()
    claim.release()
    assert sorted(os.listdir(out)) == [".keep", "keep.tmp"]


# ---------------------------------------------------------------------------------------- kills and signals
def _launch(data_dir, out, fault, *extra):
    cmd = [sys.executable, os.path.join(HERE, "fault_worker.py"), *fault,
           *args(data_dir, out, "--epochs", "2", "--set", "eval_every=5", *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)


def orphans(out):
    return [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_kill_9_mid_write_and_sigterm_mid_epoch_then_resume_bit_exact(data_dir, tmp_path):
    """Checkpoints at steps 5, 10, 15, ... (eval_every=5): a kill -9 half-way through writing one, a SIGTERM
    mid-epoch, another kill -9 mid-write; the previous checkpoint always loads, the half-written file is cleared
    by the next start, no claim stays stuck, and the resumed run logs the very numbers of an undisturbed one."""
    out = tmp_path / "killed"
    proc = _launch(data_dir, out, ("KILL_IN_WRITE", "2", "0"))           # in the write of step 10
    assert proc.returncode == -signal.SIGKILL and checkpoint_step(out) == 5 and len(orphans(out)) == 1
    assert run_folder.LOCK in os.listdir(out)                 # the dead run's lock file; its flock died with it
    proc = _launch(data_dir, out, ("TERM", "17", "0"), "--resume")
    assert proc.returncode == 128 + signal.SIGTERM and "checkpoint saved" in proc.stderr, proc.stderr
    assert checkpoint_step(out) == 17 and orphans(out) == []
    proc = _launch(data_dir, out, ("KILL_IN_WRITE", "1", "0"), "--resume")   # in the write of step 20
    assert proc.returncode == -signal.SIGKILL and checkpoint_step(out) == 17 and len(orphans(out)) == 1
    assert main(args(data_dir, out, "--epochs", "2", "--set", "eval_every=5", "--resume")) == 0
    assert orphans(out) == [] and run_folder.LOCK not in os.listdir(out)
    straight = tmp_path / "straight"
    assert main(args(data_dir, straight, "--epochs", "2", "--set", "eval_every=5")) == 0
    same_numbers(rows(out), rows(straight))
    assert [r["step"] for r in rows(out)] == [5, 10, 15, 20, 25, 30]
    a = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(rank, world, init_file, data_dir, out):
    """Rank 1 alone gets a SIGTERM after step 17; all stop at the next poll of the flag (step 20, batch 5 of
    epoch 2, its loss sums half-way), then resume in fresh runs; and an undisturbed run. Then a NaN weight at the
    transition on one process: process 0's verdict holds for all (its factors are the ones all adopt)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = build_config({"dataset": "mnist1d", "data_dir": data_dir, "model": "mlp", "model_args": {"width": 16},
                        "epochs": 3, "batch_size": 256, "threads": 1, "oialr": {"warmup_steps": 20, "update_every": 7}})
    quiet = lambda *a, **k: None                                                           # noqa: E731
    straight = start_or_resume(cfg, os.path.join(out, "straight"), False, log=quiet)
    straight.train()
    run = start_or_resume(cfg, os.path.join(out, "stopped"), False, log=quiet)
    real = run._train_step

    def step(x, y):
        real(x, y)
        if rank == 1 and run.step == 17:
            run._stop_signal = signal.SIGTERM

    run._train_step = step
    try:
        run.train()
    except Interrupted:
        pass
    resumed = start_or_resume(None, os.path.join(out, "stopped"), True, log=quiet)
    at = (resumed.step, resumed.batch_in_epoch)
    resumed.train()
    degenerate = []                                     # process 0's verdict decides: all raise, or none
    for poisoned in (1, 0):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), OIALRConfig(warmup_steps=1))
        if rank == poisoned:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        try:
            ctl.step()
            degenerate.append(None)
        except DegenerateStateError as err:
            degenerate.append(err.layers)
    same = all(torch.equal(p, q) for p, q in zip(straight.model.state_dict().values(),
                                                 resumed.model.state_dict().values()))
    torch.save({"at": at, "straight": straight.metrics, "resumed": resumed.metrics, "degenerate": degenerate,
                "weights": same},
               os.path.join(out, f"ddp{rank}.pt"))
    dist.destroy_process_group()


def test_sigterm_mid_epoch_under_ddp_resumes_every_metric_bit_exact(data_dir, tmp_path):
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "oialr.cli.start"])
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), data_dir, str(tmp_path)), nprocs=2,
                       start_method="forkserver")
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"ddp{rank}.pt", weights_only=False)
        assert seen["at"] == (20, 5) and seen["weights"] and seen["degenerate"] == [None, ["0"]]
        same_numbers(seen["resumed"], seen["straight"])


def _torchrun(data_dir, out, fault, *extra):
    """torchrun on 2 processes with ``fault``; the workers leave their pids in ``out/../pids``."""
    pids = os.path.join(os.path.dirname(out), "pids")
    os.makedirs(pids)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(HERE, "fault_worker.py"), *fault, *args(data_dir, out, "--epochs", "3", *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**ENV, "FAULT_PID_DIR": pids}, start_new_session=True)


def _end(proc, out) -> None:
    """Kill what is left of a torchrun job: torchrun's session, then each worker (frozen ones included)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    pids = os.path.join(os.path.dirname(out), "pids")
    for name in os.listdir(pids):
        pid = int(name.removesuffix(".pid"))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:       # still our worker, not a process that reused the pid
                ours = b"fault_worker.py" in f.read()
            if ours:
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def test_a_stop_signal_as_a_failed_run_ends_does_not_cut_its_last_line(data_dir, tmp_path):
    """When one process of a torchrun job dies, torchrun sends SIGTERM to the others at once: one whose training just
    failed (here: diverged) must still print why it stops, not die of the signal on its way out."""
    code = ("import os, signal, sys\n"
            "from oialr.cli import run\n"
            "from oialr.cli.failures import Diverged\n"
            "from oialr.cli.main import main\n"
            "def train(self):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    raise Diverged(float('nan'), 0.5, 7)\n"
            "run.TrainingRun.train = train\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, *args(data_dir, tmp_path / "run")], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("oialr: error: training diverged: train loss nan"), proc.stderr


def test_a_killed_ddp_worker_ends_the_job_and_keeps_the_checkpoint(data_dir, tmp_path):
    out = tmp_path / "ddp_kill"
    proc = _torchrun(data_dir, out, ("KILL", "20", "1"))
    try:
        log, _ = proc.communicate(timeout=90)
    finally:
        _end(proc, out)
    assert proc.returncode != 0 and "oialr[rank 0]: error: process 0 of 2: another process of the job died" in log, log
    assert checkpoint_step(out) == 15                       # epoch 1 (15 steps of 2 × 128 samples)


def test_a_stopped_ddp_worker_ends_the_others_within_dist_timeout(data_dir, tmp_path):
    """Rank 1 freezes (SIGSTOP) after step 18; rank 0 waits dist_timeout=3 s in the next collective, then prints
    one line naming itself. (torchrun then kills the frozen process, after its own grace period.)"""
    out = tmp_path / "ddp_stop"
    proc = _torchrun(data_dir, out, ("STOP", "18", "1"), "--set", "dist_timeout=3")
    lines, start = [], time.time()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("oialr[rank 0]: error:"):
                break
            assert time.time() - start < 90, "".join(lines)
    finally:
        _end(proc, out)
    assert lines[-1].startswith("oialr[rank 0]: error: process 0 of 2: another process of the job died, or stopped "
                                "answering for longer than dist_timeout=3s ("), "".join(lines)
    assert lines[-1].rstrip().endswith(f"; the last checkpoint in {out} is kept; continue with --resume")
    assert checkpoint_step(out) == 15
