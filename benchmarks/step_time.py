"""Training-step time, peak memory, basis-update cost and the multiply-add model of one workload, as markdown."""
from __future__ import annotations

import argparse
import gc
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

import harness
from flops import FlopModel
from workloads import CONFIGS, FULL_RANK, WORKLOADS, Config, Trainer, Workload

MB = 2 ** 20
FRACTIONS = [1.0, 0.5, 0.25, 0.1]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_activation_bytes(trainer: Trainer) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward pass, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with trainer.config.patched(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(trainer.model(trainer.x), trainer.y)
    return sum(saved.values())


def probe_memory(workload: Workload, config: Config, device: str = "cpu") -> dict:
    """Memory of a steady-state training step: one warm-up step creates the AdamW state, then the peak increase
    during two more steps (gradients, activations, temporaries) is added to the counted bytes of parameters and
    AdamW state. The increase is of the resident set size on the CPU (run in a fresh process by
    :func:`memory_rows`), of the bytes allocated by torch's caching allocator on a GPU."""
    trainer = Trainer(workload, config, device=device)
    trainer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    delta = harness.peak_memory_delta(lambda: (trainer.step(), trainer.step()), device)
    params = tensor_bytes(trainer.model.parameters())
    adam = tensor_bytes(t for state in trainer.optimizer.state.values() for t in state.values()
                        if torch.is_tensor(t) and t.dim() > 0)
    grads = tensor_bytes(p.grad for p in trainer.model.parameters() if p.grad is not None)
    return {"params": params, "adam": adam, "grads": grads, "delta": delta,
            "saved": saved_activation_bytes(trainer), "peak": params + adam + delta}


def memory_rows(workload: Workload, configs: list[str], threads: int, device: str = "cpu") -> tuple[list[list], dict]:
    """:func:`probe_memory` of every config: on the CPU one fresh process per config, two at a time (memory does
    not depend on CPU contention); on a GPU in this process, one config after the other."""
    def probe(name: str) -> dict:
        return harness.run_probe([__file__, "--model", workload.name, "--threads", str(threads),
                                  "--probe-memory", name])

    if torch.device(device).type == "cuda":
        results = {}
        for name in configs:
            results[name] = probe_memory(workload, CONFIGS[name], device)
            gc.collect()
            torch.cuda.empty_cache()
    else:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip(configs, pool.map(probe, configs)))
    base = results[FULL_RANK]["peak"]
    rows = [[name, *(f"{r[k] / MB:.1f}" for k in ("params", "adam", "grads", "saved", "delta", "peak")),
             f"{r['peak'] / base:.2f}"] for name, r in results.items()]
    return rows, results


def update_cost(trainer: Trainer, repeats: int = 3, sync=lambda: None) -> float:
    """Median seconds of one basis update (``controller._update_bases()``: SVD of every Σ, rotation of the
    factors and of the AdamW state) after the trainer's steps, over ``repeats`` updates after one untimed."""
    return harness.median(harness.interleaved({"update": trainer.controller._update_bases},
                                              repeats=repeats, calls=1, warmup=1, sync=sync)["update"])


def counts(trainer: Trainer) -> tuple[int, int]:
    params = list(trainer.model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def run(workload: Workload, *, repeats: int, steps: int, warmup: int, threads: int,
        memory: bool = True, device: str = "cpu") -> tuple[str, dict]:
    """All measurements of one workload: returns the markdown section and the numbers (for the targets table)."""
    names = list(workload.configs)
    trainers = {name: Trainer(workload, CONFIGS[name], device=device) for name in names}
    flop_model = FlopModel(workload.build(), trainers[FULL_RANK].x.cpu())
    sync = harness.synchronizer(device)
    load_before = harness.load()
    with harness.ForeignLoad() as other:
        samples = harness.interleaved({name: t.step for name, t in trainers.items()},
                                      repeats=repeats, calls=steps, warmup=warmup, sync=sync)
    base = samples[FULL_RANK]
    ratio = {name: harness.median([s / b for s, b in zip(samples[name], base)]) for name in names}
    step_ms = {name: 1e3 * harness.median(samples[name]) for name in names}
    base_macs = flop_model.step_macs(CONFIGS[FULL_RANK])
    predicted = {name: flop_model.step_macs(CONFIGS[name]) / base_macs for name in names}
    step_rows = []
    for name in names:
        trainable, stored = counts(trainers[name])
        step_rows.append([name, f"{step_ms[name]:.1f}", harness.spread(samples[name]), f"{ratio[name]:.3f}",
                          f"{predicted[name]:.3f}", f"{trainable:,}", f"{stored:,}"])

    update_rows, update = [], {}
    for name in names:
        config, trainer = CONFIGS[name], trainers[name]
        if trainer.controller is None or config.path is not None:
            continue
        seconds = update_cost(trainer, sync=sync)
        every = trainer.controller.config.update_every
        update[name] = seconds / (every * step_ms[name] / 1e3)
        update_rows.append([name, f"{1e3 * seconds:.2f}", every, f"{100 * update[name]:.2f}%"])

    on = "" if torch.device(device).type == "cpu" else f" on {harness.device_name(device)}"
    out = [f"### {workload.name}: {workload.description}{on}", "",
           f"{repeats} interleaved rounds × {steps} steps per config after {warmup} warm-up steps. Load average "
           f"{load_before} before the timed loop; other processes kept {other.cores:.2f} cores busy on average "
           "during it.", "",
           harness.markdown_table(["config", "ms/step (median)", "min/max vs median", "ratio to full-rank",
                                   "predicted ratio (MACs)", "trainable params", "stored params"], step_rows), "",
           f"Predicted full-rank step: {base_macs / 1e9:.2f} G multiply-adds (forward + backward, "
           f"attention products {3 * flop_model.attention_macs / 1e9:.2f} G of it).", "",
           "Basis update (median of 3) relative to training time at the default interval:", "",
           harness.markdown_table(["config", "ms per update", "update_every", "share of training time"],
                                  update_rows), ""]
    mem = {}
    if memory:
        rows, mem = memory_rows(workload, names, threads, device)
        increase = "peak RSS increase" if torch.device(device).type == "cpu" else "peak allocated increase"
        how = "fresh process per config" if torch.device(device).type == "cpu" else "torch's allocator statistics"
        out += [f"Memory of a steady-state training step (MiB; {how}; peak = parameters + AdamW "
                f"state + measured {increase} during the step):", "",
                harness.markdown_table(["config", "params (incl. frozen U, V)", "AdamW state", "grads",
                                        "saved activations", increase, "peak", "ratio"], rows), ""]
    out += ["Per converted layer: forward + backward multiply-adds of the full-rank layer (M), and per rank fraction "
            "the rank r, the path `oialr.layers.base.forward_path` chooses and that path's forward + backward "
            "multiply-adds relative to the full-rank layer:", "",
            harness.markdown_table(["layer", "m×n", "T (rows)", "full-rank MMAC"] + [f"f={f}: r, path, cost"
                                                                                    for f in FRACTIONS],
                                   flop_model.layer_rows(FRACTIONS)), ""]
    numbers = {"samples": samples, "step_ms": step_ms, "ratio": ratio, "predicted": predicted, "update": update,
               "memory": mem, "foreign_cores": other.cores}
    return "\n".join(out), numbers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(WORKLOADS), default="vit")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (medians over them)")
    p.add_argument("--steps", type=int, default=2, help="training steps per config per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per config first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes (one process per config)")
    p.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default cpu)")
    p.add_argument("--probe-memory", metavar="CONFIG", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    harness.setup_torch(args.threads)
    workload = WORKLOADS[args.model]
    if args.probe_memory:
        print(json.dumps(probe_memory(workload, CONFIGS[args.probe_memory])))
        return 0
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here; run on the CPU (the default) or on a GPU machine")
    text, _ = run(workload, repeats=args.repeats, steps=args.steps, warmup=args.warmup, threads=args.threads,
                  memory=not args.no_memory, device=args.device)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
