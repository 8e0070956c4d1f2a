"""oialr.integrations._grad_sync: every trained factor's gradient is averaged over the processes (single process,
with the collective replaced by a recorder)."""
import pytest
import torch
from torch import nn

from oialr import OIALR, OIALRConfig
from oialr.integrations import _grad_sync


@pytest.mark.parametrize("train_bases", [False, True])
def test_every_trained_factor_is_averaged(monkeypatch, train_bases):
    reduced = []
    monkeypatch.setattr(_grad_sync.dist, "all_reduce", lambda grad: reduced.append(grad.shape))
    monkeypatch.setattr(_grad_sync.dist, "get_world_size", lambda: 2)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    ctl = OIALR(model, torch.optim.AdamW(model.parameters()),
                OIALRConfig(warmup_steps=0, cutoff=0.0, rank_fraction=0.5, train_bases=train_bases))
    _grad_sync.FactorGradSync(ctl)
    model(torch.randn(4, 8)).sum().backward()
    layer = model[0]
    expected = [layer.lowrank_U, layer.lowrank_S, layer.lowrank_V] if train_bases else [layer.lowrank_S]
    assert sorted(reduced) == sorted(p.shape for p in expected)
