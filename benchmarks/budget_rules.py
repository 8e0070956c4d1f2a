"""Which rule should spread a size budget over layers? One-shot truncation of a trained model to each
``stored_budget``, then its loss (lower is better), with the ranks of

- ``oialr`` (oialr.budget.allocate_ranks over oialr.output_sample.output_values): ``Σ_l e_l²`` minimised, with
  ``e_l`` the relative output energy layer ``l`` loses on one training batch's outputs, greedily per stored parameter
  ``m+n+2r+1``; ``oialr (weights)``: the same rule on the singular values alone;
- ``minimax``: the largest relative energy ``e_l`` (of the singular values) any layer loses, minimised (oialr's
  rule from 2026-12-02 to 2026-12-03);
- ``energy/param``: value ``s_i²/Σ s²`` per stored parameter (the summed relative energy lost, minimised; oialr's
  rule until 2026-12-02); ``energy^p/param``: ``Σ_l e_l^p`` minimised the same way;
- ``size*energy/param``, ``sqrt-size*energy/param``: the same, each layer weighted by ``m·n`` or ``√(m·n)``;
- ``fisher/param``: the loss increase a cut predicts, ``s_i² F_ii`` with ``F_ii = Σ_jk U_ji² a_jk V_ki²`` from
  Adam's second moments ``a`` of the weight, per stored parameter;
- ``s/s1/param``: value ``s_i/s_1`` (the ``cutoff`` scale) per stored parameter; ``s/s1``: the same, cost ignored;
- ``uniform``: one rank fraction for every layer, the largest that fits.

Run, on an MNIST-1D model it trains first, or on the dense weights of a run's checkpoint (any dataset; a full-rank
run, or one still in its warm-up)::

    PYTHONPATH=src .venv/bin/python benchmarks/budget_rules.py [--model cnn] [--epochs 10]
    PYTHONPATH=src .venv/bin/python benchmarks/budget_rules.py --checkpoint runs/X/checkpoint.pt --budgets 0.3 0.1
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F

from oialr import OIALRConfig, find_layers, linalg
import heapq

from oialr.budget import allocate_ranks, marginal_cost, stored_fraction
from oialr.factorize import stored_params
from oialr.output_sample import OutputSampler, output_values
from oialr.cli.checkpoint import read_checkpoint, resumed_config
from oialr.cli.data import load_dataset, load_mnist1d
from oialr.cli.evaluation import evaluate
from oialr.cli.models import build_model
from oialr.cli.tasks import is_text, make_loaders
from oialr.targets import layer_weight


class Layers:
    """The eligible layers of a trained model: SVDs, shapes, Adam's second moments of their weights, and the output
    scales of their components on one training batch ``inputs`` (recorded as oialr does, on a copy of the model in
    training mode, so that BatchNorm's running statistics stay as trained)."""

    def __init__(self, model, optimizer, inputs):
        self.names = [info.name for info in find_layers(model, OIALRConfig()) if info.convert]
        weights = [layer_weight(model, name)[1] for name in self.names]
        self.svds = [linalg.svd(linalg.matrix_view(w.detach())) for w in weights]
        self.shapes = [tuple(u.shape[:1] + v.shape[:1]) for u, _, v in self.svds]
        self.spectra = [s for _, s, _ in self.svds]
        self.fisher = [_fisher_diagonal(u, v, optimizer.state[w]["exp_avg_sq"]) for (u, _, v), w in
                       zip(self.svds, weights)]
        sampler, probe = OutputSampler(), copy.deepcopy(model).train()
        sampler.attach(probe, self.names)
        with torch.no_grad():
            probe(inputs)
        self.values = [output_values(s, u, sampler.rows.get(name)) for name, (u, s, _) in zip(self.names, self.svds)]

    def greedy(self, budget, score):
        """greedy_ranks (floors 1, caps full) with ``score(s, i, cost, m·n, F)`` as the score of value ``i``."""
        return greedy_ranks(lambda j, i: score(self.spectra[j], i, marginal_cost(*self.shapes[j], i),
                                               self.shapes[j][0] * self.shapes[j][1], self.fisher[j]),
                            self.shapes, budget, [1] * len(self.shapes), [s.numel() for s in self.spectra])

    def uniform(self, budget):
        best = [1] * len(self.shapes)
        for step in range(1, 1001):
            ranks = [max(1, int(step / 1000 * s.numel())) for s in self.spectra]
            if stored_fraction(self.shapes, ranks) <= budget:
                best = ranks
        return best


def greedy_ranks(score, shapes, budget, floors, caps):
    """From the floors, repeatedly grow the layer whose next value ``i`` scores best (``score(layer, i)``) while its
    marginal cost fits the room left under ``budget · Σ m n``; a layer that does not fit stops growing."""
    room = budget * sum(m * n for m, n in shapes) - sum(stored_params(m, n, f) for (m, n), f in zip(shapes, floors))
    ranks, heap = list(floors), []

    def push(layer):
        if ranks[layer] < caps[layer]:
            heapq.heappush(heap, (-score(layer, ranks[layer]), layer))

    for layer in range(len(ranks)):
        push(layer)
    while heap:
        _, layer = heapq.heappop(heap)
        cost = marginal_cost(*shapes[layer], ranks[layer])
        if cost <= room:
            room -= cost
            ranks[layer] += 1
            push(layer)
    return ranks


def _fisher_diagonal(u, v, second_moment):
    """``F_ii = Σ_jk U_ji² a_jk V_ki²``: Adam's ``a = E[g²]`` seen along each singular direction ``u_i v_iᵀ``."""
    a = linalg.matrix_view(second_moment).double()
    return (((u.double() ** 2).mT @ a) * (v.double() ** 2).mT).sum(1)


def _energy(s, i):
    return float(s[i] ** 2 / (s ** 2).sum())


def _power_drop(s, i, p):
    """``e(i)^p − e(i+1)^p`` with ``e(i) = Σ_{j>=i} s_j² / Σ s²``: what value ``i`` removes from ``Σ_l e_l^p``."""
    squares = s.double() ** 2
    tail = squares[i:].sum() / squares.sum()
    return float(tail ** p - (tail - squares[i] / squares.sum()).clamp(min=0) ** p)


def _minimax(layers, budget):
    residuals = [((s.double() ** 2).flip(0).cumsum(0).flip(0) / (s.double() ** 2).sum()).tolist()
                 for s in layers.spectra]
    return greedy_ranks(lambda j, i: residuals[j][i], layers.shapes, budget, [1] * len(layers.shapes),
                        [s.numel() for s in layers.spectra])


RULES = {
    "oialr": lambda layers, b: allocate_ranks(layers.values, layers.shapes, b, [1] * len(layers.shapes),
                                              [s.numel() for s in layers.spectra]),
    "oialr (weights)": lambda layers, b: allocate_ranks(layers.spectra, layers.shapes, b, [1] * len(layers.shapes),
                                                        [s.numel() for s in layers.spectra]),
    "minimax": _minimax,
    "energy/param": lambda layers, b: layers.greedy(b, lambda s, i, c, mn, f: _energy(s, i) / c),
    "energy^2/param": lambda layers, b: layers.greedy(b, lambda s, i, c, mn, f: _power_drop(s, i, 2) / c),
    "energy^4/param": lambda layers, b: layers.greedy(b, lambda s, i, c, mn, f: _power_drop(s, i, 4) / c),
    "size*energy/param": lambda layers, b: layers.greedy(b, lambda s, i, c, mn, f: mn * _energy(s, i) / c),
    "sqrt-size*energy/param": lambda layers, b: layers.greedy(b, lambda s, i, c, mn, f: mn ** 0.5 * _energy(s, i) / c),
    "fisher/param": lambda layers, b: layers.greedy(b, lambda s, i, c, mn, f: float(s[i] ** 2 * f[i]) / c),
    "s/s1/param": lambda layers, b: layers.greedy(b, lambda s, i, c, mn, f: float(s[i] / s[0]) / c),
    "s/s1": lambda layers, b: layers.greedy(b, lambda s, i, c, mn, f: float(s[i] / s[0])),
    "uniform": lambda layers, b: layers.uniform(b),
}


def trained_mnist1d(model_name, epochs):
    """An MNIST-1D model trained with AdamW, its optimizer, its test-loss function, a training batch's inputs and a
    description."""
    torch.manual_seed(0)
    data = load_mnist1d()
    kwargs = {"depth": 3} if model_name == "mlp" else {}
    model = build_model(model_name, data.input_shape, data.num_classes, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(data.train)).split(128):
            opt.zero_grad()
            F.cross_entropy(model(data.train.x[idx]), data.train.y[idx]).backward()
            opt.step()

    def loss(m):
        with torch.no_grad():
            return F.cross_entropy(m(data.test.x), data.test.y).item()
    return model, opt, loss, data.train.x[:128], f"{model_name} on MNIST-1D, {epochs} epochs, test loss"


def from_checkpoint(path):
    """The dense model of an ``oialr train`` checkpoint, its AdamW state, its evaluation-loss function (val bits
    per byte for text), one training batch's inputs and a description."""
    state = read_checkpoint(path)
    if state["controller"] and state["controller"].get("transition_step") is not None:
        raise SystemExit(f"{path}: the run is already factored; give a full-rank run's checkpoint (or one taken "
                         "during the warm-up)")
    cfg = resumed_config(state, path, None, None)
    data = load_dataset(cfg.dataset, cfg.data_dir, context_length=cfg.context_length)
    model = build_model(cfg.model, data.input_shape, data.num_classes, **cfg.model_args)
    model.load_state_dict(state["model"])
    opt = torch.optim.AdamW(model.parameters())
    opt.load_state_dict(state["optimizer"])
    loader = make_loaders(data, cfg, 0, 1)[1]
    text = is_text(data)

    def loss(m):
        with torch.no_grad():
            value = evaluate(m, loader, torch.device("cpu"))[0]
        return value / math.log(2) if text else value
    inputs = next(iter(make_loaders(data, cfg, 0, 1)[0]))[0]
    return model, opt, loss, inputs, f"{cfg.model} on {cfg.dataset} at step {state['step']}, " + \
        ("val bits per byte" if text else "test loss")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", help="MNIST-1D model to train: mlp or cnn")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--checkpoint", help="an oialr train checkpoint.pt to truncate instead")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES), help="the rules to compare")
    args = parser.parse_args(argv)
    model, opt, loss, inputs, what = from_checkpoint(args.checkpoint) if args.checkpoint else \
        trained_mnist1d(args.model, args.epochs)
    model.eval()
    layers = Layers(model, opt, inputs)
    print(f"{what}: dense {loss(model):.4f}; {len(layers.shapes)} layers")
    print("| budget | rule | ranks (min-max) | stored | loss |\n|---|---|---|---|---|")
    for budget in args.budgets:
        for rule in args.rules:
            allocate = RULES[rule]
            ranks = allocate(layers, budget)
            cut = copy.deepcopy(model)
            with torch.no_grad():
                for name, (u, s, v), r in zip(layers.names, layers.svds, ranks):
                    weight = layer_weight(cut, name)[1]
                    weight.copy_((u[:, :r] * s[:r] @ v[:, :r].mT).view_as(weight))
            shown = ranks if len(ranks) <= 6 else f"{min(ranks)}-{max(ranks)}"
            print(f"| {budget} | {rule} | {shown} | {stored_fraction(layers.shapes, ranks):.3f} | "
                  f"{loss(cut):.4f} |", flush=True)


if __name__ == "__main__":
    main()
