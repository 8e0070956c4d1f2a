"""stored_budget, augment_bases and train_bases under torch.distributed: 2 CPU processes (gloo) hold identical factors
and ranks at every step, although each records the gradient of its own half of the batch, and resume exactly."""
import datetime
import io
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models import batches, mlp
from oialr import OIALR, OIALRConfig, distributed
from test_distributed import all_equal, factor_fingerprint

STEPS = 12
CONFIGS = {"budget+growth": dict(stored_budget=0.5, augment_bases=True),
           "budget+growth+trained bases": dict(stored_budget=0.5, augment_bases=True, train_bases=True)}


def _build(options):
    torch.manual_seed(1)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    ctl = OIALR(model, opt, OIALRConfig(**{"warmup_steps": 2, "update_every": 3, "cutoff": 0.1, **options}),
                wrap=distributed.ddp)
    return model, opt, ctl


def _train(rank, world, options, restart_after=None):
    """``restart_after``: save after that step, rebuild model, optimizer and controller (and the DDP wrapper) from
    the saved state dicts, and go on."""
    model, opt, ctl = _build(options)
    log = {"ranks": [], "cut": [], "agree": [], "fraction": []}
    for step, (x, y) in enumerate(batches((16, 16), 4, STEPS, seed=3), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(ctl.wrapped_model(x[rank::world]), y[rank::world]).backward()
        opt.step()
        if rank == 1 and step == 5:                     # rank 1's Σ differs just before an update: overridden
            with torch.no_grad():
                for layer in ctl.lowrank_layers().values():
                    layer.lowrank_S.add_(1e-3)
        ctl.step()
        log["ranks"].append({n: layer.rank for n, layer in ctl.lowrank_layers().items()})
        log["cut"].append(dict(ctl.cut_ranks))
        log["agree"].append(all_equal(factor_fingerprint(model)))
        log["fraction"].append(ctl.summary()["cut_stored_fraction"])
        if step == restart_after:
            buffer = io.BytesIO()
            torch.save({"ctl": ctl.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model, opt, ctl = _build(options)
            ctl.load_state_dict(saved["ctl"])
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
    log["final"] = factor_fingerprint(model)
    return log


def _worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    logs = {name: _train(rank, world, options) for name, options in CONFIGS.items()}
    logs["restarted"] = _train(rank, world, CONFIGS["budget+growth"], restart_after=7)   # step 8 records
    logs["gathered"] = [distributed.gather_rows(torch.full((rank + 1, 3), float(rank)), 3),   # uneven counts
                        distributed.gather_rows(None if rank == 0 else torch.ones(2, 3), 3),
                        distributed.gather_rows(None, 3)]
    torch.save(logs, os.path.join(out, f"log{rank}.pt"))
    dist.destroy_process_group()


def test_budget_and_growth_identical_on_both_processes(tmp_path):
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", __name__])
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="forkserver")
    logs = [torch.load(tmp_path / f"log{r}.pt", weights_only=True) for r in (0, 1)]
    for name in CONFIGS:
        log0, log1 = logs[0][name], logs[1][name]
        assert log0["ranks"] == log1["ranks"] and log0["cut"] == log1["cut"], name
        assert all(log0["agree"]) and all(log1["agree"]), name
        grown = [i for i, (now, cut) in enumerate(zip(log0["ranks"], log0["cut"])) if now != cut]
        assert grown, f"{name}: the test needs growth"
        if "budget" in name:
            assert all(f <= 0.5 for f in log0["fraction"][1:]), name
    # the budget's recorded output rows, stacked on process 0 in process order
    assert torch.equal(logs[0]["gathered"][0], torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3]))
    assert torch.equal(logs[0]["gathered"][1], torch.ones(2, 3)) and logs[0]["gathered"][2] is None
    assert logs[1]["gathered"] == [None, None, None]
    restarted = logs[0]["restarted"]
    assert restarted["ranks"] == logs[0]["budget+growth"]["ranks"] and all(restarted["agree"])
    assert restarted["final"] == logs[0]["budget+growth"]["final"] == logs[1]["restarted"]["final"]
