"""Memory per process, step time and bytes communicated per step of the byte-level Llama, 2 CPU processes (gloo):
DDP vs FSDP2, full-rank vs OIALR's low-rank phase.

    .venv/bin/python benchmarks/fsdp_memory.py            # configs/lm_llama.yaml's model: width 384, 4 blocks
    .venv/bin/python benchmarks/fsdp_memory.py --hidden 128 --layers 2 --heads 2 --intermediate 384 --context 128

Each of the four runs starts 2 fresh processes (``MALLOC_MMAP_THRESHOLD_`` set, so freed tensors leave the
resident set at once), builds the model (``build_model("llama", ...)``, as ``oialr train`` does), shards it
(FSDP2: every converted projection its own unit, then the root, :func:`oialr.sharding.shard_targets`) or wraps it
in DDP, and trains ``--warmup`` untimed then ``--steps`` timed steps of AdamW on random bytes (global batch
``--batch`` windows, split over the processes; gradient clipping at 1.0 as in the config). OIALR converts at
construction (``warmup_steps=0``, ``cutoff`` 0.15, ranks capped at ``--rank-fraction`` of full rank, since random
weights keep almost every singular value), so the timed steps are low-rank steps. Per process:

- state MB: the bytes of this process's parameters, gradients and optimizer state (its shards under FSDP2; under
  DDP also its gradient buckets, which DDP keeps beside the gradients), counted after the last step;
- peak RSS MB: the kernel's high-water mark of the resident set over the training steps (reset after setup), and
  its rise above the resident set before them ("RSS before": imports, gloo, data, the model after setup); the
  lifetime peak also covers setup, where every process builds the whole dense model before FSDP2 shards it (as
  ``oialr train`` does; building on the meta device would avoid it);
- step time: the median of the timed steps, forward to optimizer step;
- MB sent per step: the payload of every collective a process starts in one step: DDP's gradient buckets
  (all-reduce, counted by a comm hook), FSDP2's all-gathers (forward, and again in backward for every non-root
  unit) and reduce-scatters (counted by wrapping ``dist.all_gather_single``/``reduce_scatter_single``), and any
  ``dist.broadcast``. A ring moves ``2(w-1)/w`` of an all-reduce's payload per process and ``(w-1)/w`` of an
  all-gather's or a reduce-scatter's. Not counted: gradient clipping's norm (a few bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import harness
from oialr import OIALR, OIALRConfig, distributed
from oialr.cli.models import build_model

RUNS = [("ddp", "full-rank"), ("ddp", "oialr"), ("fsdp", "full-rank"), ("fsdp", "oialr")]
MB = 2 ** 20


def counting_collectives(sent: dict[str, int]) -> None:
    """Add the payload bytes of every FSDP2 all-gather (its gathered output) and reduce-scatter (its input) and of
    every broadcast to ``sent``."""
    payloads = {"all_gather_single": ("all-gather", lambda a, k: a[0] if a else k["output_tensor"]),
                "reduce_scatter_single": ("reduce-scatter", lambda a, k: k["input"] if "input" in k else a[1]),
                "broadcast": ("broadcast", lambda a, k: a[0] if a else k["tensor"])}
    for name, (key, payload) in payloads.items():
        real = getattr(dist, name)

        def counted(*args, real=real, key=key, payload=payload, **kwargs):
            tensor = payload(args, kwargs)
            sent[key] = sent.get(key, 0) + tensor.numel() * tensor.element_size()
            return real(*args, **kwargs)

        setattr(dist, name, counted)


def counting_ddp(sent: dict[str, int]):
    """``distributed.ddp`` whose gradient buckets add their bytes to ``sent["all-reduce"]``."""
    def wrap(module):
        ddp = distributed.ddp(module)

        def hook(state, bucket):
            sent["all-reduce"] = sent.get("all-reduce", 0) + bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, hook)
        return ddp
    return wrap


def local_bytes(tensor) -> int:
    t = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return t.numel() * t.element_size()


def state_bytes(model, optimizer, net) -> int:
    """This process's parameters, gradients, optimizer state tensors (and DDP's gradient buckets)."""
    total = sum(local_bytes(p) + (local_bytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    total += sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0)
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):      # buckets: one flat copy of the gradients
        total += sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
    return total


def worker(rank: int, world: int, init_file: str, parallel: str, method: str, args: argparse.Namespace,
           out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model("llama", (args.context,), 256, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=args.intermediate)
    dense_params = sum(p.numel() for p in model.parameters())
    config = OIALRConfig(warmup_steps=0, update_every=10 ** 9, cutoff=0.15, rank_fraction=args.rank_fraction)
    sent: dict[str, int] = {}
    shard = None
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        from oialr.sharding import shard_targets
        shard = fully_shard
        shard_targets(model, config, shard)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    wrap = counting_ddp(sent) if parallel == "ddp" else None
    ctl = None
    if method == "oialr":
        ctl = OIALR(model, optimizer, config, wrap=wrap, shard=shard)       # converts here (warmup_steps=0)
    net = ctl.wrapped_model if ctl is not None else wrap(model) if wrap is not None else model
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 256, (args.batch, args.context + 1), generator=g) for _ in range(args.warmup + args.steps)]
    counting_collectives(sent)
    rss_before = harness.status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:       # the high-water mark from here on: the training steps
        f.write("5")
    times = []
    for i, batch in enumerate(data):
        if i == args.warmup:
            sent.clear()
        x, y = batch[rank::world, :-1], batch[rank::world, 1:]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x).flatten(0, -2), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if ctl is not None:
            ctl.step()
        times.append(time.perf_counter() - start)
    row = {"parallel": parallel, "method": method, "dense_params": dense_params,
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "ranks": sorted({layer.rank for layer in ctl.lowrank_layers().values()}) if ctl is not None else [],
           "state": state_bytes(model, optimizer, net), "peak_rss": harness.status_kib("VmHWM") * 1024,
           "rss_before": rss_before, "lifetime_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "step_seconds": statistics.median(times[args.warmup:]),
           "sent": {k: v / args.steps for k, v in sent.items()}}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def table(results: list[list[dict]]) -> str:
    lines = ["| parallel | phase | trainable params | ranks | state MB / process | peak RSS MB in training (rise) | "
             "RSS before MB | lifetime peak RSS MB | step s | MB sent / step / process (all-reduce, all-gather, "
             "reduce-scatter) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rows in results:
        r = rows[0]
        sent = r["sent"]
        parts = ", ".join(f"{sent.get(k, 0) / MB:.2f}" for k in ("all-reduce", "all-gather", "reduce-scatter"))
        phase = "full-rank" if r["method"] == "full-rank" else "OIALR low-rank"
        lines.append(f"| {r['parallel']} | {phase} | {r['trainable']:,} | {', '.join(map(str, r['ranks'])) or '-'} | "
                     f"{max(x['state'] for x in rows) / MB:.1f} | {max(x['peak_rss'] for x in rows) / MB:.0f} "
                     f"(+{max(x['peak_rss'] - x['rss_before'] for x in rows) / MB:.0f}) | "
                     f"{max(x['rss_before'] for x in rows) / MB:.0f} | "
                     f"{max(x['lifetime_peak_rss'] for x in rows) / MB:.0f} | "
                     f"{max(x['step_seconds'] for x in rows):.3f} | {sum(sent.values()) / MB:.2f} ({parts}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch (windows), split over the 2 processes")
    parser.add_argument("--rank-fraction", type=float, default=0.25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    os.environ.update(harness.PROBE_ENV)                # read by each fresh process's allocator
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for i, (parallel, method) in enumerate(RUNS):
            out = os.path.join(folder, f"{i}.json")
            mp.start_processes(worker, args=(2, os.path.join(folder, f"init{i}"), parallel, method, args, out),
                               nprocs=2, start_method="spawn")
            with open(out) as f:
                results.append(json.load(f))
    print(f"byte-level Llama: width {args.hidden}, {args.layers} blocks, {args.heads} heads, MLP {args.intermediate}, "
          f"context {args.context}, global batch {args.batch}; {results[0][0]['dense_params']:,} parameters; "
          f"2 processes, 1 thread each; torch {torch.__version__}")
    print(table(results))


if __name__ == "__main__":
    main()
    sys.exit(0)
