"""Which rule should spread a size budget over layers? One-shot truncation of a trained MNIST-1D model to each
``stored_budget``: test loss and accuracy with the ranks of

- ``energy/param`` (oialr.budget.allocate_ranks): value ``s_i²/Σ s²`` per stored parameter ``m+n+2r+1``;
- ``s/s1/param``: value ``s_i/s_1`` (the ``cutoff`` scale) per stored parameter;
- ``s/s1``: value ``s_i/s_1``, cost ignored (a global cutoff at the budget);
- ``uniform``: one rank fraction for every layer, the largest that fits.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/budget_rules.py [--model cnn] [--epochs 10]``."""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from oialr import OIALRConfig, find_layers, linalg
from oialr.budget import allocate_ranks, greedy_ranks, marginal_cost, stored_fraction
from oialr.cli.data import load_mnist1d
from oialr.cli.models import build_model
from oialr.targets import layer_weight


def greedy(spectra, shapes, budget, worth):
    """oialr.budget.greedy_ranks (floors 1, caps full) with ``worth(s, i, cost)`` as the score of value ``i``."""
    return greedy_ranks(lambda j, i: worth(spectra[j], i, marginal_cost(*shapes[j], i)), shapes, budget,
                        [1] * len(shapes), [s.numel() for s in spectra])


def uniform(spectra, shapes, budget):
    best = [1] * len(shapes)
    for step in range(1, 1001):
        ranks = [max(1, int(step / 1000 * s.numel())) for s in spectra]
        if stored_fraction(shapes, ranks) <= budget:
            best = ranks
    return best


RULES = {
    "energy/param": lambda sp, sh, b: allocate_ranks(sp, sh, b, [1] * len(sh), [s.numel() for s in sp]),
    "s/s1/param": lambda sp, sh, b: greedy(sp, sh, b, lambda s, i, c: float(s[i] / s[0]) / c),
    "s/s1": lambda sp, sh, b: greedy(sp, sh, b, lambda s, i, c: float(s[i] / s[0])),
    "uniform": uniform,
}


def evaluate(model, split):
    with torch.no_grad():
        logits = model(split.x)
    return F.cross_entropy(logits, split.y).item(), (logits.argmax(1) == split.y).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = load_mnist1d()
    kwargs = {"depth": 3} if args.model == "mlp" else {}
    model = build_model(args.model, data.input_shape, data.num_classes, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(data.train)).split(128):
            opt.zero_grad()
            F.cross_entropy(model(data.train.x[idx]), data.train.y[idx]).backward()
            opt.step()
    names = [info.name for info in find_layers(model, OIALRConfig()) if info.convert]
    mats = [linalg.matrix_view(layer_weight(model, name)[1].detach()) for name in names]
    svds = [linalg.svd(w) for w in mats]
    shapes = [tuple(w.shape) for w in mats]
    loss, acc = evaluate(model, data.test)
    print(f"{args.model} on MNIST-1D, {args.epochs} epochs, layers {shapes}: dense test loss {loss:.3f}, "
          f"accuracy {acc:.3f}")
    print("| budget | rule | ranks | stored | test loss | accuracy |\n|---|---|---|---|---|---|")
    for budget in (0.5, 0.25, 0.1):
        for rule, allocate in RULES.items():
            ranks = allocate([s for _, s, _ in svds], shapes, budget)
            cut = copy.deepcopy(model)
            with torch.no_grad():
                for name, (u, s, v), r in zip(names, svds, ranks):
                    weight = layer_weight(cut, name)[1]
                    weight.copy_((u[:, :r] * s[:r] @ v[:, :r].mT).view_as(weight))
            loss, acc = evaluate(cut, data.test)
            print(f"| {budget} | {rule} | {ranks} | {stored_fraction(shapes, ranks):.3f} | {loss:.3f} | {acc:.3f} |")


if __name__ == "__main__":
    main()
