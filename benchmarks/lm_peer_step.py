"""Training-step time of the byte-level Llama (configs/lm_llama.yaml: width 384, 4 blocks, batch 8 × 256 bytes) in
its low-rank forms, against the factorized peer ``B A`` at rank 96: OIALR's ``U Σ Vᵀ`` with trained bases at rank 96
(the peer's ranks, the ``r²`` of ``Σ`` on top) and at rank 88 (the peer's stored fraction), each through the path
the library picks and through the chain ``U (Σ (Vᵀ x))``; full-rank for scale.

CPU time of this process, one thread, the configurations interleaved step by step, the median of ``--repeats``
steps each (other jobs on the machine then disturb every configuration alike). No basis update runs: it is timed by
``benchmarks/rank_options.py``.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/lm_peer_step.py [--repeats 9]``."""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from oialr import OIALR, OIALRConfig, force_path
from oialr.baselines import FactorizedTraining
from oialr.cli.models import build_model

CONTEXT, BATCH, VOCAB = 256, 8, 256
SIZES = {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "intermediate_size": 1024}


def build(method: str, rank_fraction: float | None):
    """A fresh model (seed 0) and AdamW, converted as ``method`` says (``full-rank``, ``factorized``, ``oialr``)."""
    torch.manual_seed(0)
    model = build_model("llama", (CONTEXT,), VOCAB, **SIZES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    config = OIALRConfig(warmup_steps=0, cutoff=0.0, rank_fraction=rank_fraction or 1.0, train_bases=True,
                         update_every=10 ** 9)
    if method == "factorized":
        FactorizedTraining(model, optimizer, config, rank_fraction)
    elif method == "oialr":
        OIALR(model, optimizer, config)
    return model, optimizer


def train_step(model, optimizer, x, y, path: str | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    with force_path(path) if path else contextlib.nullcontext():
        logits = model(x)
    F.cross_entropy(logits.flatten(0, -2), y.flatten()).backward()
    optimizer.step()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = {                                    # name: (method, rank fraction, forced path)
        "factorized B A, rank 96": ("factorized", 0.25, None),
        "OIALR U Σ Vᵀ, rank 96, trained bases": ("oialr", 0.25, None),
        "the same, chain path": ("oialr", 0.25, "chain"),
        "OIALR U Σ Vᵀ, rank 88, trained bases": ("oialr", 0.229, None),
        "full-rank": ("full-rank", None, None),
    }
    built = {name: (*build(method, fraction), path) for name, (method, fraction, path) in rows.items()}
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g) for _ in range(2))
    times: dict[str, list[float]] = {name: [] for name in rows}
    for repeat in range(args.repeats + 1):     # the first round warms up and is not counted
        for name, (model, optimizer, path) in built.items():
            start = time.process_time()
            train_step(model, optimizer, x, y, path)
            if repeat:
                times[name].append(time.process_time() - start)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    base = median["factorized B A, rank 96"]
    print("| form | step (ms CPU) | ÷ factorized |\n|---|---|---|")
    for name, t in median.items():
        print(f"| {name} | {t * 1e3:.0f} | {t / base:.3f} |")


if __name__ == "__main__":
    main()
