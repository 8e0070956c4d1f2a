"""torch.compile over the factored layers: the compiled model trains exactly as the eager one through the
transition and rank changes, each Σ shape traced as one graph (no graph breaks)."""
import pytest
import torch
from torch import nn

import oialr
from models import MODELS, batches

CONFIG = oialr.OIALRConfig(warmup_steps=3, update_every=2, cutoff=0.6, max_drop_fraction=0.5)


def train(build, shape, n_out, compiled: bool, steps: int = 9):
    torch.manual_seed(0)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrap = (lambda m: torch.compile(m, backend="aot_eager", fullgraph=True)) if compiled else None
    ctl = oialr.OIALR(model, optimizer, CONFIG, wrap=wrap)
    losses = []
    for x, y in batches(shape, n_out, steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(ctl.wrapped_model(x), y)
        loss.backward()
        optimizer.step()
        ctl.step()
        losses.append(loss.item())
    return losses, {name: layer.rank for name, layer in ctl.lowrank_layers().items()}


@pytest.mark.parametrize("name, build, shape, n_out", MODELS, ids=[m[0] for m in MODELS])
def test_compiled_training_matches_eager_through_rank_changes(name, build, shape, n_out):
    torch._dynamo.reset()
    eager_losses, eager_ranks = train(build, shape, n_out, compiled=False)
    compiled_losses, compiled_ranks = train(build, shape, n_out, compiled=True)
    full = {n: min(layer.matrix_shape) for n, layer in _factored(build, shape, n_out).items()}
    assert any(eager_ranks[n] < full[n] for n in full), "the schedule must change some rank for this test"
    assert compiled_ranks == eager_ranks
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)


def _factored(build, shape, n_out):
    torch.manual_seed(0)
    model = build()
    ctl = oialr.OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), oialr.OIALRConfig(warmup_steps=0))
    return ctl.lowrank_layers()


def test_compile_keeps_one_graph_across_30_rank_changes():
    """Σ's size is a dynamic dimension (oialr.layers.dynamic): after the dense graph and the first low-rank one no
    rank change recompiles (recompile_limit 4 with fullgraph=True would fail), and the compiled run trains exactly
    as the eager one."""
    from torch._dynamo.utils import counters

    def run(compiled):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 80), nn.ReLU(), nn.Linear(80, 80), nn.ReLU(), nn.Linear(80, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        wrap = (lambda m: torch.compile(m, backend="aot_eager", fullgraph=True)) if compiled else None
        config = oialr.OIALRConfig(warmup_steps=1, update_every=1, cutoff=0.0, max_drop_fraction=1 / 40)
        ctl = oialr.OIALR(model, optimizer, config, wrap=wrap)
        losses, ranks = [], []
        for x, y in batches((8, 16), 4, 44):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(ctl.wrapped_model(x), y)
            loss.backward()
            optimizer.step()
            ctl.step()
            ctl.config.cutoff = 0.999       # after the full-rank transition: each update drops floor(r / 40) values
            losses.append(loss.item())
            ranks.append(model[2].rank if ctl.phase == "low-rank" else 80)
        return losses, ranks

    eager_losses, eager_ranks = run(compiled=False)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=4):
        compiled_losses, compiled_ranks = run(compiled=True)
    assert sum(a != b for a, b in zip(eager_ranks, eager_ranks[1:])) >= 30
    assert compiled_ranks == eager_ranks
    assert counters["stats"]["unique_graphs"] == 2                      # the dense model, the factored model
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
