"""What OIALRConfig's augment_bases and train_bases cost on the Fashion-MNIST mini-ViT (CPU, batch 32, one thread,
CPU time of this process, so that other jobs on the machine disturb the numbers less):

- train_bases: training-step time and the bytes of parameters, gradients and optimizer state, against Σ-only;
- augment_bases (at ``stored_budget=0.25``, ``cutoff=0``): the extra time of one basis update (the recording step's
  extra backward work plus the widening) as a fraction of the ``update_every`` steps between two updates, and the
  step time of the widened model (up to twice the cut ranks between updates) against the cut one.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/rank_options.py [--steps 10] [--update-every 100]``."""
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
    config = OIALRConfig(**{"warmup_steps": 0, "cutoff": 0.0, "update_every": 10 ** 9, **options})
    ctl = OIALR(model, opt, config)
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    return model, opt, ctl, x, y


def timed(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def median(values) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def train_step(model, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def step_time(model, opt, x, y, steps) -> float:
    train_step(model, opt, x, y)                                            # warm-up
    return median(timed(lambda: train_step(model, opt, x, y)) for _ in range(steps))


def state_bytes(model, opt) -> int:
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--update-every", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name, options in (("Σ only", {}), ("train_bases", {"train_bases": True})):
        model, opt, _, x, y = setup(rank_fraction=0.5, **options)
        t = step_time(model, opt, x, y, args.steps)
        print(f"{name:12s} (rank ½): step {t * 1e3:7.1f} ms CPU, params + grads + optimizer state "
              f"{state_bytes(model, opt) / 2**20:6.2f} MB")
    results = {}
    for augment in (False, True):
        model, opt, ctl, x, y = setup(stored_budget=0.25, augment_bases=augment, update_every=args.steps + 1)
        plain, recorded, updates = [], [], []
        for _ in range(3):                  # one cycle: `steps` plain steps, the recorded one, the basis update
            times = []
            for _ in range(args.steps):     # ctl.step() after the last one arms the recording of the next step
                times.append(timed(lambda: train_step(model, opt, x, y)))      # noqa: B023 (called here)
                ctl.step()
            plain.append(median(times[1:]))                                     # widened after the first update
            recorded.append(timed(lambda: train_step(model, opt, x, y)))          # noqa: B023 (called here)
            updates.append(timed(ctl.step))                                     # the basis update (and widening)
        results[augment] = (median(plain), median(recorded), median(updates))
    base, aug = results[False], results[True]
    extra = (aug[1] - aug[0]) + (aug[2] - base[2])
    print(f"stored_budget=0.25: step {base[0] * 1e3:.1f} ms CPU at the cut ranks, {aug[0] * 1e3:.1f} ms widened "
          f"(augment_bases); basis update {base[2] * 1e3:.1f} ms, with augment_bases {aug[2] * 1e3:.1f} ms; "
          f"recording step {aug[1] * 1e3:.1f} ms vs {aug[0] * 1e3:.1f} ms; extra per update {extra * 1e3:.1f} ms = "
          f"{100 * extra / (args.update_every * aug[0]):.2f}% of {args.update_every} steps")


if __name__ == "__main__":
    main()
