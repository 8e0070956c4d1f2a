"""What OIALRConfig's augment_bases and train_bases cost on the Fashion-MNIST mini-ViT (CPU, batch 32):

- train_bases: training-step time and the bytes of parameters, gradients and optimizer state, against Σ-only;
- augment_bases: the extra time of one basis update (the recording step's extra backward work plus the widening),
  as a fraction of the ``update_every`` steps between two updates.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/rank_options.py [--steps 20] [--update-every 100]``."""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from oialr import OIALR, OIALRConfig
from oialr.cli.models import build_model

BATCH = 32


def setup(**options):
    torch.manual_seed(0)
    model = build_model("vit", (1, 28, 28), 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=0, cutoff=0.0, rank_fraction=0.5, update_every=10 ** 9,
                                        **options))
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    return model, opt, ctl, x, y


def step(model, opt, x, y) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def median_step(model, opt, x, y, steps) -> float:
    step(model, opt, x, y)                                                   # warm-up
    return sorted(step(model, opt, x, y) for _ in range(steps))[steps // 2]


def state_bytes(model, opt) -> int:
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--update-every", type=int, default=100)
    args = parser.parse_args(argv)
    for name, options in (("Σ only", {}), ("train_bases", {"train_bases": True})):
        model, opt, _, x, y = setup(**options)
        t = median_step(model, opt, x, y, args.steps)
        print(f"{name:12s} step {t * 1e3:7.1f} ms, params + grads + optimizer state "
              f"{state_bytes(model, opt) / 2**20:6.2f} MB")
    costs = {}
    for augment in (False, True):
        model, opt, ctl, x, y = setup(augment_bases=augment)
        plain = median_step(model, opt, x, y, args.steps)
        recorded, updates = [], []
        for _ in range(5):
            if augment:
                ctl._recorder.start(ctl.lowrank_layers())               # as ctl.step() does before an update
            recorded.append(step(model, opt, x, y))
            start = time.perf_counter()
            ctl.update_bases()
            updates.append(time.perf_counter() - start)
        costs[augment] = (plain, sorted(recorded)[2], sorted(updates)[2])
    base, aug = costs[False], costs[True]
    extra = (aug[1] - aug[0]) + (aug[2] - base[2])
    print(f"basis update {base[2] * 1e3:.1f} ms, with augment_bases {aug[2] * 1e3:.1f} ms; recording step "
          f"{aug[1] * 1e3:.1f} ms vs {aug[0] * 1e3:.1f} ms; extra per update {extra * 1e3:.1f} ms = "
          f"{100 * extra / (args.update_every * aug[0]):.2f}% of {args.update_every} steps")


if __name__ == "__main__":
    main()
