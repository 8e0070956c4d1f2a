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
from flops import FlopModel, layer_rows
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

    with trainer.config.path_context(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
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


def measure_memory(workload: Workload, configs: list[str], threads: int, device: str = "cpu") -> dict[str, dict]:
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
        return results
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(configs, pool.map(probe, configs)))


def update_cost(trainer: Trainer, repeats: int = 3, sync=lambda: None) -> float:
    """Median seconds of one basis update (``controller.update_bases()``: SVD of every Σ, rotation of the
    factors and of the AdamW state) after the trainer's steps, over ``repeats`` updates after one untimed."""
    return harness.median(harness.interleaved({"update": trainer.controller.update_bases},
                                              repeats=repeats, calls=1, warmup=1, sync=sync)["update"])


def counts(trainer: Trainer) -> tuple[int, int]:
    params = list(trainer.model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def measure(workload: Workload, *, repeats: int, steps: int, warmup: int, threads: int,
            memory: bool = True, device: str = "cpu") -> dict:
    """All measurements of one workload, as plain data: step-time samples per config (seconds per step, one per
    round), their medians (``step_ms``) and per-round ratios to full-rank (``ratio``), the multiply-add prediction
    (``predicted``, ``base_macs``, ``attention_macs``, per-layer ``layers``), parameter counts, basis-update cost
    (``update_ms`` and ``update``, its share of training time at ``update_every``), the memory probes (``memory``,
    empty without ``memory``) and the load around the timed loop."""
    names = list(workload.configs)
    trainers = {name: Trainer(workload, CONFIGS[name], device=device) for name in names}
    flop_model = FlopModel(workload.build(), trainers[FULL_RANK].x.cpu())
    sync = harness.synchronizer(device)
    load_before = harness.load()
    with harness.ForeignLoad() as other:
        samples = harness.interleaved({name: t.step for name, t in trainers.items()},
                                      repeats=repeats, calls=steps, warmup=warmup, sync=sync)
    base = samples[FULL_RANK]
    step_ms = {name: 1e3 * harness.median(samples[name]) for name in names}
    base_macs = flop_model.step_macs(CONFIGS[FULL_RANK])
    update_ms, update_every, update = {}, {}, {}
    for name in names:
        config, trainer = CONFIGS[name], trainers[name]
        if trainer.controller is None or config.path is not None:
            continue
        seconds = update_cost(trainer, sync=sync)
        update_ms[name], update_every[name] = 1e3 * seconds, trainer.controller.config.update_every
        update[name] = seconds / (update_every[name] * step_ms[name] / 1e3)
    return {
        "workload": workload.name, "description": workload.description, "repeats": repeats, "steps": steps,
        "warmup": warmup, "device": device, "device_name": harness.device_name(device),
        "load_before": load_before, "foreign_cores": other.cores,
        "samples": samples, "step_ms": step_ms,
        "ratio": {name: harness.median([s / b for s, b in zip(samples[name], base)]) for name in names},
        "predicted": {name: flop_model.step_macs(CONFIGS[name]) / base_macs for name in names},
        "base_macs": base_macs, "attention_macs": flop_model.attention_macs,
        "params": {name: dict(zip(("trainable", "stored"), counts(t))) for name, t in trainers.items()},
        "update_ms": update_ms, "update_every": update_every, "update": update,
        "memory": measure_memory(workload, names, threads, device) if memory else {},
        "layers": flop_model.layer_costs(FRACTIONS),
    }


def render(numbers: dict) -> str:
    """The markdown section of one workload from :func:`measure`'s numbers."""
    names, samples = list(numbers["samples"]), numbers["samples"]
    cuda = torch.device(numbers["device"]).type != "cpu"
    step_rows = [[name, f"{numbers['step_ms'][name]:.1f}", harness.spread(samples[name]),
                  f"{numbers['ratio'][name]:.3f}", f"{numbers['predicted'][name]:.3f}",
                  f"{numbers['params'][name]['trainable']:,}", f"{numbers['params'][name]['stored']:,}"]
                 for name in names]
    update_rows = [[name, f"{ms:.2f}", numbers["update_every"][name], f"{100 * numbers['update'][name]:.2f}%"]
                   for name, ms in numbers["update_ms"].items()]
    on = f" on {numbers['device_name']}" if cuda else ""
    out = [f"### {numbers['workload']}: {numbers['description']}{on}", "",
           f"{numbers['repeats']} interleaved rounds × {numbers['steps']} steps per config after {numbers['warmup']} "
           f"warm-up steps. Load average {numbers['load_before']} before the timed loop; other processes kept "
           f"{numbers['foreign_cores']:.2f} cores busy on average during it.", "",
           harness.markdown_table(["config", "ms/step (median)", "min/max vs median", "ratio to full-rank",
                                   "predicted ratio (MACs)", "trainable params", "stored params"], step_rows), "",
           f"Predicted full-rank step: {numbers['base_macs'] / 1e9:.2f} G multiply-adds (forward + backward, "
           f"attention products {3 * numbers['attention_macs'] / 1e9:.2f} G of it).", "",
           "Basis update (median of 3) relative to training time at the default interval:", "",
           harness.markdown_table(["config", "ms per update", "update_every", "share of training time"],
                                  update_rows), ""]
    mem = numbers["memory"]
    if mem:
        base = mem[FULL_RANK]["peak"]
        rows = [[name, *(f"{r[k] / MB:.1f}" for k in ("params", "adam", "grads", "saved", "delta", "peak")),
                 f"{r['peak'] / base:.2f}"] for name, r in mem.items()]
        increase = "peak allocated increase" if cuda else "peak RSS increase"
        how = "torch's allocator statistics" if cuda else "fresh process per config"
        out += [f"Memory of a steady-state training step (MiB; {how}; peak = parameters + AdamW "
                f"state + measured {increase} during the step):", "",
                harness.markdown_table(["config", "params (incl. frozen U, V)", "AdamW state", "grads",
                                        "saved activations", increase, "peak", "ratio"], rows), ""]
    out += ["Per converted layer: forward + backward multiply-adds of the full-rank layer (M), and per rank fraction "
            "the rank r, the path `oialr.layers.forward_path` chooses and that path's forward + backward "
            "multiply-adds relative to the full-rank layer:", "",
            harness.markdown_table(["layer", "m×n", "T (rows)", "full-rank MMAC"] + [f"f={f}: r, path, cost"
                                                                                    for f in FRACTIONS],
                                   layer_rows(numbers["layers"])), ""]
    return "\n".join(out)


def run(workload: Workload, *, repeats: int, steps: int, warmup: int, threads: int,
        memory: bool = True, device: str = "cpu") -> tuple[str, dict]:
    """:func:`measure` then :func:`render`: the markdown section and the numbers (for the targets table)."""
    numbers = measure(workload, repeats=repeats, steps=steps, warmup=warmup, threads=threads, memory=memory,
                      device=device)
    return render(numbers), numbers


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
