"""Rank growth (OIALRConfig(augment_bases=True)): the maths of oialr.growth, the recorder, and training that regains
rank, on every layer kind, with exact resume."""
import io

import pytest
import torch
from torch import nn

from oialr import OIALR, OIALRConfig
from oialr.factorize import Factors, basis_update
from oialr.growth import GradientRecorder, carry_gradients, new_directions, widen
from oialr.layers import LowRankLinear
from models import MODELS, batches


def _orthonormal(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def test_new_directions_are_orthonormal_and_span_what_the_basis_misses():
    B = _orthonormal(20, 4, 0)
    missing = _orthonormal(20, 7, 1)[:, 4:]                                        # 3 directions outside B
    missing = missing - B @ (B.mT @ missing)
    grad = B @ torch.randn(4, 5, dtype=torch.float64) + missing @ torch.randn(3, 5, dtype=torch.float64)
    Q = new_directions(B, grad, count=4)
    assert Q.shape == (20, 3)                                                      # only 3 exist
    assert torch.allclose(Q.mT @ Q, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert (B.mT @ Q).abs().max() < 1e-12
    P = grad - B @ (B.mT @ grad)
    assert torch.allclose(Q @ (Q.mT @ P), P, atol=1e-10)                          # spans the projected gradient
    assert new_directions(B, grad, count=2).shape == (20, 2)
    assert new_directions(B, B @ torch.randn(4, 5, dtype=torch.float64), count=4).shape == (20, 0)


def test_widen_keeps_the_product_and_pads_sigma_with_zeros():
    U, V = _orthonormal(12, 3, 2), _orthonormal(9, 3, 3)
    S = torch.randn(3, 3, dtype=torch.float64)
    gU, gV = torch.randn(12, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    U2, S2, V2 = widen(Factors(U, S, V), gU, gV)
    assert U2.shape == (12, 6) and V2.shape == (9, 6) and S2.shape == (6, 6)        # at most doubled
    assert torch.equal(S2[:3, :3], S) and not S2[3:].any() and not S2[:, 3:].any()
    assert torch.allclose(U2 @ S2 @ V2.mT, U @ S @ V.mT)
    for Q in (U2, V2):
        assert torch.allclose(Q.mT @ Q, torch.eye(6, dtype=torch.float64), atol=1e-12)
    U3, _, V3 = widen(Factors(U2, S2, V2), torch.randn(12, 6, dtype=torch.float64),
                      torch.randn(9, 6, dtype=torch.float64))
    assert U3.shape[1] == V3.shape[1] == 9                                         # capped at min(m, n)


def test_widen_takes_the_strongest_directions_of_the_side_that_offers_more():
    U, V = _orthonormal(12, 3, 4), _orthonormal(12, 3, 5)
    S = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    d = _orthonormal(12, 6, 6)[:, 3:]
    d = torch.linalg.qr(d - U @ (U.mT @ d))[0]                 # three directions U misses, the last the strongest
    gU = d * torch.tensor([1.0, 0.5, 10.0], dtype=torch.float64)
    gV = (V[:, :1] + _orthonormal(12, 4, 7)[:, 3:]).expand(12, 3).clone()      # V misses one direction only
    U2, _, V2 = widen(Factors(U, S, V), gU, gV)
    assert U2.shape[1] == V2.shape[1] == 4
    assert abs(float(U2[:, 3] @ d[:, 2])) > 1 - 1e-9                # not the first column of the QR of gU


def test_carried_gradients_are_those_of_the_cut_bases():
    m, n, r, k = 10, 8, 5, 3
    g = torch.Generator().manual_seed(8)
    U = _orthonormal(m, r, 9) + 1e-2 * torch.randn(m, r, generator=g, dtype=torch.float64)    # drifted (trained)
    V = _orthonormal(n, r, 10)
    S, G = torch.randn(r, r, generator=g, dtype=torch.float64), torch.randn(m, n, generator=g, dtype=torch.float64)
    update = basis_update(U, S, V, OIALRConfig(), rank=k)
    assert not torch.allclose(update.R_U, torch.eye(r, dtype=torch.float64))
    gU, gV = carry_gradients((G @ V @ S.mT, G.mT @ U @ S), update)                  # ∂L/∂U, ∂L/∂V before
    assert gU.shape == (m, k) and gV.shape == (n, k)
    assert torch.allclose(gU, G @ update.V @ update.S.mT, atol=1e-10)             # after, from the same G
    assert torch.allclose(gV, G.mT @ update.U @ update.S, atol=1e-10)


def test_recorder_gives_the_bases_gradients_of_the_dense_gradient():
    """∂L/∂U = G V Σᵀ and ∂L/∂V = Gᵀ U Σ with G = ∂L/∂W, from the factored forward path."""
    torch.manual_seed(0)
    U, V = _orthonormal(10, 3, 4).float(), _orthonormal(7, 3, 5).float()
    layer = LowRankLinear(U.clone(), torch.randn(3, 3), V.clone(), bias=None)
    x, target = torch.randn(32, 7), torch.randn(32, 10)
    recorder = GradientRecorder()
    recorder.start({"l": layer})
    for _ in range(2):                                                             # summed over two backwards
        ((layer(x) - target) ** 2).sum().backward()
    grads = recorder.stop()
    W = layer.dense_matrix().detach().requires_grad_(True)
    (2 * ((x @ W.mT - target) ** 2).sum()).backward()
    G, S = W.grad, layer.lowrank_S.detach()
    assert torch.allclose(grads["l"][0], G @ V @ S.mT, atol=1e-3)
    assert torch.allclose(grads["l"][1], G.mT @ U @ S, atol=1e-3)
    assert not layer.lowrank_U.requires_grad and layer.lowrank_U.grad is None      # frozen again


def _regression(augment, steps=80, seed=0):
    """A 24×24 layer fitting a rank-8 target, cut to rank 2 at the transition (step 0)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(24, 8, generator=g) @ torch.randn(8, 24, generator=g) / 4
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 24, bias=False))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    config = OIALRConfig(warmup_steps=0, update_every=5, cutoff=0.05, rank_fraction=2 / 24, min_rank=2,
                         keep_output_layer_dense=False, augment_bases=augment)
    ctl = OIALR(model, opt, config)
    assert ctl.lowrank_layers()["0"].rank == 2
    for _ in range(steps):
        x = torch.randn(64, 24, generator=g)
        loss = ((model(x) - x @ target.mT) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step()
    return loss.item(), ctl.cut_ranks["0"]


def test_a_layer_cut_too_deep_regains_rank_and_a_lower_loss():
    frozen_loss, frozen_rank = _regression(augment=False)
    grown_loss, grown_rank = _regression(augment=True)
    assert frozen_rank == 2
    assert grown_rank == 8                                 # the target's rank: the cut drops unneeded directions
    assert grown_loss < 0.01 * frozen_loss, (grown_loss, frozen_loss)


def test_augment_config_is_validated():
    with pytest.raises(ValueError, match="augment_bases must be True or False, got 1"):
        OIALRConfig(augment_bases=1)
    with pytest.raises(ValueError, match="max_drop_fraction=0 never cuts after the transition"):
        OIALRConfig(augment_bases=True, max_drop_fraction=0)


@pytest.mark.parametrize("name, build, shape, n_out", MODELS, ids=[m[0] for m in MODELS])
def test_growth_widens_every_layer_kind_and_keeps_the_function(name, build, shape, n_out):
    torch.manual_seed(0)
    model = build().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=1, update_every=2, cutoff=0.0, rank_fraction=0.3,
                                        augment_bases=True))
    probe = torch.randn(*shape)
    for step, (x, y) in enumerate(batches(shape, n_out, 3), start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(ctl.wrapped_model(x), y).backward()
        opt.step()
        if step == 3:                                       # the update (and growth) happens in this ctl.step()
            before_ranks = {n: layer.rank for n, layer in ctl.lowrank_layers().items()}
            with torch.no_grad():
                before = model(probe)
        ctl.step()
    after_ranks = {n: layer.rank for n, layer in ctl.lowrank_layers().items()}
    assert ctl.cut_ranks == before_ranks                   # cutoff 0: the cut keeps every value
    assert all(after_ranks[n] > r for n, r in before_ranks.items() if r < min(ctl.lowrank_layers()[n].matrix_shape))
    with torch.no_grad():
        assert torch.allclose(model(probe), before, atol=1e-5)
    for layer in ctl.lowrank_layers().values():
        for Q in (layer.lowrank_U, layer.lowrank_V):
            assert torch.allclose(Q.mT @ Q, torch.eye(Q.shape[1]), atol=1e-5)
        assert not layer.lowrank_U.requires_grad and layer.lowrank_S in opt.state
        assert opt.state[layer.lowrank_S]["exp_avg"].shape == layer.lowrank_S.shape
    summary = ctl.summary()
    assert summary["stored_fraction"] > summary["cut_stored_fraction"]


def _run(steps, stop_at=None, state=None, train_bases=False):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=2, update_every=3, cutoff=0.2, stored_budget=0.5,
                                        augment_bases=True, train_bases=train_bases))
    start = 0
    if state is not None:
        ctl.load_state_dict(state["ctl"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["ctl"]["step"]
    ranks = []
    for step, (x, y) in enumerate(batches((16, 16), 4, steps, seed=2)[start:], start=start + 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ctl.step()
        ranks.append({n: layer.rank for n, layer in ctl.lowrank_layers().items()})
        if step == stop_at:
            buffer = io.BytesIO()
            torch.save({"ctl": ctl.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            buffer.seek(0)
            return torch.load(buffer, weights_only=True)
    return model, opt, ranks


@pytest.mark.parametrize("train_bases", [False, True], ids=["frozen-bases", "trained-bases"])
def test_resume_after_growth_is_exact(train_bases):
    """Saved at step 7, whose next step records the gradient for the update (and growth) at step 8."""
    model, opt, ranks = _run(14, train_bases=train_bases)
    assert ranks[4] != ranks[3], "the test needs growth before step 7"
    assert ranks[7] == ranks[4] and ranks[7] != ranks[3], "step 8 cuts to the budget and grows again"
    saved = _run(14, stop_at=7, train_bases=train_bases)
    resumed, resumed_opt, resumed_ranks = _run(14, state=saved, train_bases=train_bases)
    assert resumed_ranks == ranks[7:]
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    a, b = opt.state_dict()["state"], resumed_opt.state_dict()["state"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_growth_at_the_first_update_after_a_transition_at_construction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=0, update_every=1, cutoff=0.0, rank_fraction=0.25,
                                        augment_bases=True))
    x, y = batches((8, 16), 4, 1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    ctl.step()
    assert ctl.cut_ranks == {"0": 4} and ctl.lowrank_layers()["0"].rank == 8


def test_a_last_update_without_growth_leaves_the_model_within_the_budget():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=1, update_every=2, cutoff=0.0, stored_budget=0.5,
                                        augment_bases=True))
    for x, y in batches((16, 16), 4, 3, seed=2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ctl.step()
    assert ctl.summary()["stored_fraction"] > 0.5 >= ctl.summary()["cut_stored_fraction"]
    ctl.update_bases(grow=False)
    assert {n: layer.rank for n, layer in ctl.lowrank_layers().items()} == ctl.cut_ranks
    assert ctl.summary()["stored_fraction"] == ctl.summary()["cut_stored_fraction"] <= 0.5
