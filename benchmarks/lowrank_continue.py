"""Does the low-rank form itself slow training down? From one full-rank checkpoint of a byte-level Llama run
(``oialr train --config configs/lm_llama.yaml --method full-rank``), train the same batches for ``--steps`` more
steps at a fixed learning rate as:

- ``full``: full-rank, as the run went on;
- ``svd``: every projection cut by SVD to one rank and trained as two balanced factors ``B A`` (svd-finetune's form);
- ``tb``: OIALR with ``stored_budget`` and ``train_bases`` (``U Σ Vᵀ``, all three trained), no basis update;
- ``tb-upd``: the same with a basis update every ``--update-every`` steps;
- ``svd-budget``: ``B A`` at the ranks ``tb`` gets from the budget; ``tb-uniform``: ``U Σ Vᵀ`` at ``svd``'s rank
  (which form learns faster, and which ranks);
- ``frozen``: OIALR as in the paper at the budget's ranks (``U``, ``V`` frozen, only ``Σ`` trains);
- ``frozen-scaled``, ``tb-scaled``: ``frozen`` and ``tb`` with each ``Σ``'s learning rate times ``√(m n) / r``, so
  that an Adam step moves ``U Σ Vᵀ`` as far (Frobenius norm, ``lr·r`` for ``Σ``) as it moves a dense weight
  (``lr·√(m n)``);

and print validation bits per byte (first ``--windows`` windows of 256 bytes) right after the cut and at three
points. Run::

    PYTHONPATH=src .venv/bin/python benchmarks/lowrank_continue.py runs/X/checkpoint.pt --lr 0.00037
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from oialr import OIALR, OIALRConfig
from oialr.baselines.factorized import FactorizedTraining
from oialr.cli.checkpoint import read_checkpoint, resumed_config
from oialr.cli.data import load_dataset
from oialr.cli.models import build_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--rank", type=int, default=68, help="svd's rank (68 of 384 stores 0.3 of the projections)")
    parser.add_argument("--update-every", type=int, default=50)
    parser.add_argument("--windows", type=int, default=96)
    parser.add_argument("--variants", default="full,svd,tb,tb-upd")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    state = read_checkpoint(args.checkpoint)
    cfg = resumed_config(state, args.checkpoint, None, None)
    data = load_dataset(cfg.dataset, cfg.data_dir, context_length=cfg.context_length)
    n = cfg.context_length + 1
    windows = torch.stack([data.val[i * n:(i + 1) * n].long() for i in range(args.windows)])

    @torch.no_grad()
    def val_bpb(model):
        model.eval()
        total = sum(F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
                    for w in windows.split(16))
        model.train()
        return total / windows[:, 1:].numel() / math.log(2)

    for kind in args.variants.split(","):
        model = build_model(cfg.model, data.input_shape, data.num_classes, **cfg.model_args)
        model.load_state_dict(state["model"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=cfg.weight_decay)
        optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        for group in optimizer.param_groups:
            group["lr"] = args.lr
        ctl = None
        if kind == "svd":
            ctl = FactorizedTraining(model, optimizer, OIALRConfig(), args.rank, 0)
        elif kind == "svd-budget":
            ctl = FactorizedTraining(model, optimizer, OIALRConfig(), budget_ranks(model, args.budget), 0)
        elif kind == "tb-uniform":
            fraction = args.rank / min(model.lm.config.hidden_size, model.lm.config.intermediate_size)
            ctl = OIALR(model, optimizer, OIALRConfig(warmup_steps=0, cutoff=0.0, train_bases=True,
                                                      update_every=10 ** 9, rank_fraction=fraction))
        elif kind in ("tb", "tb-upd", "frozen", "frozen-scaled", "tb-scaled"):
            ctl = OIALR(model, optimizer, OIALRConfig(warmup_steps=0, cutoff=0.0, stored_budget=args.budget,
                                                      train_bases=kind.startswith("tb"),
                                                      update_every=args.update_every if kind == "tb-upd" else 10 ** 9))
            if kind.endswith("-scaled"):
                scale_sigma_rates(ctl, optimizer, args.lr)
        generator = torch.Generator().manual_seed(1)
        start, curve, began = val_bpb(model), [], time.time()
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, len(data.train) - n, (cfg.batch_size,), generator=generator)
            batch = torch.stack([data.train[i:i + n].long() for i in idx])
            optimizer.zero_grad()
            F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if ctl is not None:
                ctl.step()
            if step % (args.steps // 3) == 0:
                curve.append(f"{val_bpb(model):.4f}")
        print(f"{kind}: after the cut {start:.4f}, then {' '.join(curve)} ({time.time() - began:.0f} s)", flush=True)


def scale_sigma_rates(ctl, optimizer, lr: float) -> None:
    """Move every layer's ``Σ (r×r)`` into a param group of its own at ``lr · √(m n) / r``."""
    for layer in ctl.lowrank_layers().values():
        m, n = layer.matrix_shape
        sigma = layer.lowrank_S
        group = next(g for g in optimizer.param_groups if any(p is sigma for p in g["params"]))
        group["params"] = [p for p in group["params"] if p is not sigma]
        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": [sigma],
                                   "lr": lr * (m * n) ** 0.5 / layer.rank})


def budget_ranks(model, budget: float) -> str:
    """The ranks OIALR's budget gives ``model``'s layers, as a results.json file (FactorizedTraining's rank file)."""
    probe = copy.deepcopy(model)
    ctl = OIALR(probe, torch.optim.SGD(probe.parameters(), lr=0.0), OIALRConfig(warmup_steps=0, cutoff=0.0,
                                                                              stored_budget=budget))
    layers = {name: {"rank": layer["rank"]} for name, layer in ctl.summary()["layers"].items()}
    path = os.path.join(tempfile.mkdtemp(), "results.json")
    with open(path, "w") as f:
        json.dump({"layers": layers}, f)
    return path


if __name__ == "__main__":
    main()
