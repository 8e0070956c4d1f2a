"""Measured communication of OIALR under DDP for the CLI's mini-ViT: factor broadcasts vs gradient all-reduces.

    .venv/bin/python benchmarks/comm_volume.py              # 2 CPU processes (gloo), prints a markdown table

For each rank fraction, 2 processes build ``build_model("vit", (1, 28, 28), 10)`` (width 192, depth 6, patch 7),
convert it at the transition (``warmup_steps=0``, ``cutoff=0``, so every layer keeps ``ceil(f·min(m, n))``),
train one step through DDP and run one basis update. Bytes are counted where they are sent: every
``torch.distributed.broadcast`` issued by the controller (transition, update) and every bucket DDP all-reduces
(a counting comm hook). DDP's own broadcast of all parameters and buffers when its wrapper is rebuilt (only after
a rank change) is reported from the model's sizes, since DDP sends it through an internal call.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from oialr import OIALR, OIALRConfig, distributed
from oialr.cli.models import build_model

FRACTIONS = (1.0, 0.5, 0.25, 0.1)
UPDATE_EVERY = 100           # the amortisation: one basis update per this many optimizer steps


def measure(fraction: float) -> dict[str, float]:
    sent = {"broadcast": 0, "allreduce": 0}
    real_broadcast = dist.broadcast

    def counting_broadcast(tensor, *args, **kwargs):
        sent["broadcast"] += tensor.numel() * tensor.element_size()
        return real_broadcast(tensor, *args, **kwargs)

    def counting_allreduce(state, bucket):
        sent["allreduce"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    def wrap(module: nn.Module) -> nn.Module:
        ddp = distributed.ddp(module)
        ddp.register_comm_hook(None, counting_allreduce)
        return ddp

    torch.manual_seed(0)
    model = build_model("vit", (1, 28, 28), 10)
    dense_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dist.broadcast = counting_broadcast
    try:
        ctl = OIALR(model, optimizer, OIALRConfig(warmup_steps=0, update_every=1, cutoff=0.0, rank_fraction=fraction),
                    wrap=wrap)                                  # the transition happens here
        transition, sent["broadcast"] = sent["broadcast"], 0
        x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
        nn.functional.cross_entropy(ctl.wrapped_model(x), y).backward()
        optimizer.step()
        ctl.step()                                              # update_every=1: one basis update
    finally:
        dist.broadcast = real_broadcast
    layers = ctl.lowrank_layers().values()
    ranks = {layer.matrix_shape: layer.rank for layer in layers}
    sharded = sum(8 * 2 * layer.rank ** 2 + 4 * layer.rank + 8 for layer in layers)    # u, v, s, k (see the doc)
    return {"fraction": fraction, "ranks": ranks, "dense_trainable": dense_trainable, "sharded": sharded,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "rebuild": 4 * sum(t.numel() for t in [*model.parameters(), *model.buffers()]),
            "allreduce": sent["allreduce"], "transition": transition, "update": sent["broadcast"]}


def worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = [measure(f) for f in FRACTIONS]
    if rank == 0:
        print(table(rows))
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    mb = 1e6
    dense = 4 * rows[0]["dense_trainable"]
    lines = [f"full-rank phase: {rows[0]['dense_trainable']:,} trainable parameters, {dense / mb:.2f} MB all-reduced "
             f"per step; amortised = one update per {UPDATE_EVERY} steps", "",
             "| rank fraction | ranks (qkv, proj, fc1, fc2, patch) | trainable params | all-reduce / step | "
             "broadcast / update | update ÷ step | amortised update ÷ step | low-rank step ÷ full-rank step | "
             "broadcast / transition | DDP rebuild (rank change) | sharded design: update (estimate) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = ", ".join(str(r["ranks"][s]) for s in ((576, 192), (192, 192), (768, 192), (192, 768), (192, 49)))
        ratio = r["update"] / r["allreduce"]
        per_step = (r["allreduce"] + r["update"] / UPDATE_EVERY) / dense
        lines.append(f"| {r['fraction']} | {ranks} | {r['trainable']:,} | {r['allreduce'] / mb:.3f} MB | "
                     f"{r['update'] / mb:.2f} MB | {ratio:.1f}× | {ratio / UPDATE_EVERY:.1%} | {per_step:.1%} | "
                     f"{r['transition'] / mb:.2f} MB | {r['rebuild'] / mb:.2f} MB | {r['sharded'] / mb:.2f} MB |")
    return "\n".join(lines)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(2, os.path.join(folder, "init")), nprocs=2)
    sys.exit(0)
