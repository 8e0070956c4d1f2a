"""Train a small MLP on MNIST-1D with OIALR and print the controller's summary before and after.

    python examples/quickstart.py          # ~10 s on 2 CPU cores
"""
import random

import numpy as np
import torch
from torch import nn

import oialr


def mnist1d(seed: int = 42):
    """MNIST-1D generated procedurally by the ``mnist1d`` package (never downloaded); global RNGs left untouched."""
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    args = get_dataset_args()
    args.seed = seed
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    as_tensors = lambda x, y: (torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long))
    return as_tensors(data["x"], data["y"]), as_tensors(data["x_test"], data["y_test"])


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def main():
    torch.manual_seed(0)
    torch.set_flush_denormal(True)     # on CPU, denormal floats in Adam's moments can slow training tenfold
    (x, y), (x_test, y_test) = mnist1d()
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    ctl = oialr.OIALR(model, optimizer, oialr.OIALRConfig(warmup_steps=400, update_every=100, cutoff=0.1))

    def show(when):
        s = ctl.summary()
        print(f"{when}: phase={s['phase']} step={s['step']} trainable={s['trainable_params']:,} "
              f"(dense {s['dense_trainable_params']:,}) stored={s['stored_params']:,}")
        print("  ranks:", {name: f"{info['rank']}/{info['full_rank']}" for name, info in s["layers"].items()})

    show("before")
    epochs, batch = 40, 100
    for epoch in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            ctl.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  test accuracy {accuracy(model, x_test, y_test):.3f}  phase {ctl.phase}")
    show("after")
    print(ctl.table())


if __name__ == "__main__":
    main()
