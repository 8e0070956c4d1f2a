import inspect
import io

import pytest
import torch
from torch import nn

import oialr
from oialr import OIALR, OIALRConfig
from models import MODELS, batches, mlp

FULL = dict(cutoff=0.0, rank_fraction=1.0)


def train(model, opt, ctl, data, loss_fn=nn.functional.cross_entropy):
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        ctl.step()


def trainable(model):
    return {id(p) for p in model.parameters() if p.requires_grad}


def in_optimizer(opt):
    return {id(p) for g in opt.param_groups for p in g["params"]}


# ---------------------------------------------------------------------------------------- contract over toy models
@pytest.mark.parametrize("name, build, shape, n_out", MODELS, ids=[m[0] for m in MODELS])
def test_contract(name, build, shape, n_out):
    model = build().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=2, update_every=2, **FULL))
    data = batches(shape, n_out, 9)
    train(model, opt, ctl, data[:1])
    biases = {n: p for n, p in model.named_parameters() if n.endswith("bias")}
    train(model, opt, ctl, data[1:2])                               # the transition happens in this step
    assert ctl.phase == "low-rank" and ctl.transition_step == 2
    lowrank = ctl.lowrank_layers()
    assert lowrank, "no layer was converted"
    assert in_optimizer(opt) == trainable(model)
    for step in range(3, 10):
        train(model, opt, ctl, data[step - 1:step])
        assert in_optimizer(opt) == trainable(model), f"optimizer and model disagree after step {step}"
        assert all(isinstance(layer, oialr.LowRankLayer) for layer in ctl.lowrank_layers().values())
    biases_after = {n: p for n, p in model.named_parameters() if n.endswith("bias")}
    for n, p in biases.items():                                      # same objects, still trained
        assert any(q is p for q in biases_after.values()), f"bias {n} was replaced"
    summary = ctl.summary()
    assert summary["trainable_params"] < summary["dense_trainable_params"]
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name, build, shape, n_out", MODELS, ids=[m[0] for m in MODELS])
def test_transition_is_exact_at_full_rank(name, build, shape, n_out):
    model = build().eval()
    x = batches(shape, n_out, 1)[0][0]
    expected = model(x).detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=0, keep_output_layer_dense=False, **FULL))
    assert all(layer.rank == min(layer.matrix_shape) for layer in ctl.lowrank_layers().values())
    out = model(x).detach()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 1e-4
    # a basis update with cutoff 0 does not change the function either
    for layer in ctl.lowrank_layers().values():
        layer.lowrank_S.data += 0.05 * torch.randn_like(layer.lowrank_S)
    moved = model(x).detach()
    ctl.update_bases()
    torch.testing.assert_close(model(x).detach(), moved, rtol=1e-4, atol=1e-5)
    for layer in ctl.lowrank_layers().values():
        S = layer.lowrank_S
        torch.testing.assert_close(S, torch.diag(torch.diagonal(S)))   # Σ diagonal again after an update


# ---------------------------------------------------------------------------------------- schedule
def test_schedule_counts_optimizer_steps(monkeypatch):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=3, update_every=2))
    updates = []
    real = ctl.update_bases
    monkeypatch.setattr(ctl, "update_bases", lambda: (updates.append(ctl.step_count), real()))
    phases = []
    for _ in range(9):
        with torch.no_grad():
            model(torch.randn(2, 16))                    # evaluation: advances nothing
        phases.append(ctl.phase)
        ctl.step()
    assert phases == ["full-rank"] * 3 + ["low-rank"] * 6
    assert ctl.transition_step == 3 and ctl.step_count == 9
    assert updates == [5, 7, 9]


def test_warmup_zero_converts_at_construction():
    model = mlp()
    ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.01), OIALRConfig(warmup_steps=0))
    assert ctl.phase == "low-rank" and ctl.transition_step == 0
    assert isinstance(model[0], oialr.LowRankLinear) and isinstance(model[4], nn.Linear)   # head kept dense


# ---------------------------------------------------------------------------------------- rank selection
def _set_singular_values(linear, s):
    m, n = linear.weight.shape
    u, _ = torch.linalg.qr(torch.randn(m, len(s)))
    v, _ = torch.linalg.qr(torch.randn(n, len(s)))
    with torch.no_grad():
        linear.weight.copy_(u @ torch.diag(torch.tensor(s)) @ v.T)


def test_transition_truncates_known_spectrum():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 2))
    _set_singular_values(model[0], [10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), OIALRConfig(warmup_steps=0, cutoff=0.15))
    layer = model[0]
    assert layer.rank == 3
    torch.testing.assert_close(torch.diagonal(layer.lowrank_S), torch.tensor([10.0, 5.0, 2.0]), atol=1e-4, rtol=0)
    assert ctl.summary()["layers"]["0"] == {"rank": 3, "full_rank": 6, "shape": [6, 8], "dense_params": 48,
                                            "trainable_params": 9, "stored_params": 3 * (6 + 8 + 3)}


def test_rank_fraction_caps_the_rank():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1),
          OIALRConfig(warmup_steps=0, cutoff=0.0, rank_fraction=0.25))
    assert model[0].rank == 3                            # ceil(0.25 · 10)


@pytest.mark.parametrize("max_drop, min_rank, expected", [(1.0, 1, 2), (0.5, 1, 3), (1.0, 4, 4), (0.0, 1, 6)])
def test_basis_update_truncates_sigma(max_drop, min_rank, expected):
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 2))
    nn.init.orthogonal_(model[0].weight)                  # all singular values 1: full rank 6 at the transition
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=0, update_every=1, cutoff=0.3, min_rank=min_rank,
                                        max_drop_fraction=max_drop, rank_fraction=1.0))
    layer = model[0]
    assert layer.rank == 6
    # give Σ the known spectrum [10, 5, 2, 1, 0.5, 0.1] in a rotated basis
    q1, _ = torch.linalg.qr(torch.randn(layer.rank, layer.rank))
    q2, _ = torch.linalg.qr(torch.randn(layer.rank, layer.rank))
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])[:layer.rank]
    with torch.no_grad():
        layer.lowrank_S.copy_(q1 @ torch.diag(s) @ q2.T)
    dense_before = layer.dense_matrix().detach()
    ctl.step()
    assert layer.rank == expected
    torch.testing.assert_close(torch.diagonal(layer.lowrank_S), s[:expected], atol=1e-4, rtol=0)
    # the kept part equals the best rank-k approximation of the old W
    u, sv, vh = torch.linalg.svd(dense_before)
    best = u[:, :expected] @ torch.diag(sv[:expected]) @ vh[:expected]
    torch.testing.assert_close(layer.dense_matrix().detach(), best, atol=1e-4, rtol=1e-4)
    assert oialr.linalg.orthonormality_error(layer.lowrank_U) < 1e-5
    assert in_optimizer(opt) == trainable(model)


# ---------------------------------------------------------------------------------------- optimizer state
def test_sigma_joins_the_weights_param_group():
    model = mlp()
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[0].bias], "lr": 0.5, "weight_decay": 0.3},
                             {"params": [p for p in model.parameters()
                                         if p is not model[0].weight and p is not model[0].bias], "lr": 0.01}])
    OIALR(model, opt, OIALRConfig(warmup_steps=0))
    group0 = opt.param_groups[0]
    assert group0["params"][0] is model[0].lowrank_S and group0["params"][1] is model[0].bias
    assert group0["lr"] == 0.5 and group0["weight_decay"] == 0.3
    assert any(p is model[2].lowrank_S for p in opt.param_groups[1]["params"])


def test_transition_frees_each_dense_weight_and_its_state_before_the_next_svd(monkeypatch):
    import gc
    import weakref

    import oialr.controller
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=2, **FULL))
    train(model, opt, ctl, batches((8, 16), 4, 1))          # AdamW state exists for every dense weight
    converted, alive_at_call = [], []

    def convert_layer(*args, **kwargs):
        gc.collect()
        alive_at_call.append([ref() is not None for ref in converted])
        weight, layer = real(*args, **kwargs)
        converted.append(weakref.ref(weight))
        return weight, layer

    real = oialr.controller.convert_layer
    monkeypatch.setattr(oialr.controller, "convert_layer", convert_layer)
    train(model, opt, ctl, batches((8, 16), 4, 1, seed=1))
    assert ctl.phase == "low-rank"
    assert alive_at_call == [[], [False]]                 # two layers convert; the output layer stays dense


def test_adam_first_update_after_transition_is_not_oversized():
    model = mlp()
    lr = 1e-2
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=5, **FULL))
    data = batches((8, 16), 4, 6)
    train(model, opt, ctl, data[:5])
    S = model[0].lowrank_S
    assert S not in opt.state                              # fresh state: step 0, zero moments
    before = S.detach().clone()
    train(model, opt, ctl, data[5:])
    assert opt.state[S]["step"].item() == 1
    # a bias-corrected first Adam step moves every entry by at most lr (the published code moved ~3x lr)
    assert (S.detach() - before).abs().max() <= lr * 1.001


def test_adam_moments_rotate_at_basis_update():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=1, update_every=3, **FULL))
    data = batches((8, 16), 4, 4)
    train(model, opt, ctl, data[:3])
    x, y = data[3]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    S = model[0].lowrank_S
    state = {k: v.clone() for k, v in opt.state[S].items()}
    u, s, vh = torch.linalg.svd(S.detach().double())
    v = vh.T
    ctl.step()                                             # step 4: the basis update
    new = opt.state[model[0].lowrank_S]
    torch.testing.assert_close(new["exp_avg"], (u.T @ state["exp_avg"].double() @ v).float(), atol=1e-6, rtol=1e-5)
    expected = (u * u).T @ state["exp_avg_sq"].double() @ (v * v)
    torch.testing.assert_close(new["exp_avg_sq"], expected.float(), atol=1e-9, rtol=1e-5)
    assert new["step"] == state["step"]
    assert new["max_exp_avg_sq"].shape == new["exp_avg"].shape


def test_second_moment_is_exact_for_permutations_and_keeps_its_scale_under_mixing_rotations():
    from oialr import optim_state
    p = nn.Parameter(torch.zeros(3, 3))
    opt = torch.optim.Adam([p])
    grads = torch.randn(50, 3, 3, dtype=torch.float64)
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3, 3),
                    "exp_avg_sq": grads.square().mean(0).float()}
    perm = torch.eye(3, dtype=torch.float64)[[2, 0, 1]] * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    optim_state.rotate(opt, p, p, perm, perm)
    exact = (perm.T @ grads @ perm).square().mean(0)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), exact, rtol=1e-6, atol=1e-7)
    # A rotation that mixes every coordinate (Σ with close singular values, as after the transition): uncorrelated
    # gradient entries keep their mean square, and so must Adam's estimate (an upper bound grew it ~1700-fold here,
    # shrinking the steps on Σ).
    r = 64
    p = nn.Parameter(torch.zeros(r, r))
    opt = torch.optim.Adam([p])
    grads = torch.randn(400, r, r, dtype=torch.float64) * torch.linspace(0.5, 2.0, r, dtype=torch.float64)
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(r, r),
                    "exp_avg_sq": grads.square().mean(0).float()}
    u, _ = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))
    optim_state.rotate(opt, p, p, u, v)
    got, true = opt.state[p]["exp_avg_sq"].double(), (u.T @ grads @ v).square().mean(0)
    assert got.mean().item() == pytest.approx(true.mean().item(), rel=0.02)
    assert (got / true).median().item() == pytest.approx(1.0, rel=0.15)


def test_sgd_momentum_is_projected_at_transition_and_rotated_at_updates():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=3, update_every=2, **FULL))
    data = batches((8, 16), 4, 5)
    train(model, opt, ctl, data[:2])
    x, y = data[2]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    W = model[0].weight
    buf = opt.state[W]["momentum_buffer"].clone()
    ctl.step()                                                      # step 3: the transition
    layer = model[0]
    assert W not in opt.state
    expected = layer.lowrank_U.T @ buf @ layer.lowrank_V
    torch.testing.assert_close(opt.state[layer.lowrank_S]["momentum_buffer"], expected)
    train(model, opt, ctl, data[3:5])                               # step 5: a basis update
    assert opt.state[layer.lowrank_S]["momentum_buffer"].shape == layer.lowrank_S.shape


def test_sgd_momentum_projection_formula():
    from oialr import optim_state
    W = nn.Parameter(torch.randn(5, 4))
    S = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([W], lr=0.1, momentum=0.9)
    opt.state[W] = {"momentum_buffer": torch.randn(5, 4)}
    buf = opt.state[W]["momentum_buffer"].clone()
    U, _ = torch.linalg.qr(torch.randn(5, 2))
    V, _ = torch.linalg.qr(torch.randn(4, 2))
    optim_state.enter_lowrank(opt, W, S, U, V)
    assert opt.param_groups[0]["params"] == [S]
    torch.testing.assert_close(opt.state[S]["momentum_buffer"], U.T @ buf @ V)


def test_unknown_optimizer_gets_fresh_state_and_one_warning():
    model = mlp()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=1, update_every=1))
    data = batches((8, 16), 4, 4)
    with pytest.warns(UserWarning, match="RMSprop") as record:
        train(model, opt, ctl, data)
    assert sum("RMSprop" in str(w.message) for w in record) == 1
    assert in_optimizer(opt) == trainable(model)


# ---------------------------------------------------------------------------------------- robustness
def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: v.clone() if torch.is_tensor(v) else v for st in opt.state.values() for k, v in st.items()},
            [id(p) for g in opt.param_groups for p in g["params"]])


def _assert_unchanged(before, model, opt):
    state, optim, ids = before
    after = _snapshot(model, opt)
    assert state.keys() == after[0].keys() and ids == after[2]
    for k, v in state.items():
        torch.testing.assert_close(v, after[0][k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert all(torch.equal(v, after[1][k]) if torch.is_tensor(v) else v == after[1][k] for k, v in optim.items())


@pytest.mark.parametrize("where, value, found", [
    ("S", float("nan"), "'0' (Σ: 1 NaN)"), ("U", float("nan"), "'0' (U: 1 NaN)"),
    ("V", float("inf"), "'0' (V: 1 Inf)"), ("S", 0.0, "'0' (Σ: all zeros)")])
def test_degenerate_factors_refuse_the_basis_update_and_change_nothing(where, value, found):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=1, update_every=2, cutoff=0.5))
    train(model, opt, ctl, batches((8, 16), 4, 3))          # transition at 1, one update at 3: Adam state exists
    with torch.no_grad():
        factor = getattr(model[0], f"lowrank_{where}")
        factor.fill_(0.0) if value == 0.0 else factor.view(-1)[0].fill_(value)
    ctl.step()                                              # step 4: nothing scheduled
    before = _snapshot(model, opt)
    with pytest.raises(oialr.DegenerateStateError) as err:
        ctl.step()                                          # step 5: the basis update
    assert str(err.value).startswith(f"OIALR basis update at step 5 refused: {found}. Nothing was changed")
    assert err.value.layers == ["0"] and err.value.step == 5 and ctl.step_count == 4
    _assert_unchanged(before, model, opt)


@pytest.mark.parametrize("value, found", [(float("nan"), "'0' (W: 1 NaN)"), (float("-inf"), "'0' (W: 1 Inf)"),
                                          (0.0, "'0' (W: all zeros)")])
def test_degenerate_weight_refuses_the_transition_and_changes_nothing(value, found):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=2, update_every=2))
    train(model, opt, ctl, batches((8, 16), 4, 1))
    with torch.no_grad():
        model[0].weight.fill_(0.0) if value == 0.0 else model[0].weight.view(-1)[3].fill_(value)
        model[2].weight.view(-1)[0].fill_(float("nan"))
    before = _snapshot(model, opt)
    with pytest.raises(oialr.DegenerateStateError) as err:
        ctl.step()
    assert str(err.value).startswith(f"OIALR transition at step 2 refused: {found}; '2' (W: 1 NaN). Nothing was "
                                     "changed")
    assert err.value.layers == ["0", "2"] and ctl.step_count == 1 and ctl.phase == "full-rank"
    assert not any(isinstance(m, oialr.LowRankLayer) for m in model.modules())
    _assert_unchanged(before, model, opt)


def test_no_eligible_layer_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 4), nn.ReLU())
    with pytest.raises(ValueError, match="no layer of the model can be converted; OIALR converts nn.Linear"):
        OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1))
    single = nn.Sequential(nn.Linear(4, 2))                 # only an output layer, kept dense by default
    with pytest.raises(ValueError, match="output layer"):
        OIALR(single, torch.optim.SGD(single.parameters(), lr=0.1))


def test_weight_missing_from_optimizer_is_a_clear_error():
    model = mlp()
    opt = torch.optim.SGD(list(model[2].parameters()) + list(model[4].parameters()), lr=0.1)
    with pytest.raises(ValueError, match="'0' trains .* but is not in the optimizer"):
        OIALR(model, opt, OIALRConfig(warmup_steps=0))


def test_bad_arguments():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        OIALR(model, [model[0].weight])
    with pytest.raises(TypeError, match=r"config must be an oialr.OIALRConfig \(or None for the defaults\), got dict"):
        OIALR(model, opt, {"cutoff": 0.1})


# ---------------------------------------------------------------------------------------- resume, determinism
def _run(steps, state=None, stop_at=None, seed=1, lr=3e-2, data_seed=3, **config):
    """Train an MLP for ``steps`` batches (or up to ``stop_at``), optionally restoring ``state`` first; return the
    model, the ranks after each step, the controller and a saved state."""
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ctl = OIALR(model, opt, OIALRConfig(**(config or dict(warmup_steps=3, update_every=2, cutoff=0.3))))
    start = 0
    if state is not None:
        ctl.load_state_dict(state["ctl"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = ctl.step_count
    ranks = []
    for x, y in batches((16, 16), 4, steps, seed=data_seed)[start:stop_at]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ctl.step()
        ranks.append({n: layer.rank for n, layer in ctl.lowrank_layers().items()})
    saved = {"ctl": ctl.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}
    return model, ranks, ctl, saved


def test_exact_resume_after_rank_changes():
    full, full_ranks, _, _ = _run(14)
    assert full_ranks[7] != full_ranks[2], "the test needs a rank change before the checkpoint"
    _, _, _, saved = _run(14, stop_at=8)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_ranks, _, _ = _run(14, state=saved)
    assert resumed_ranks == full_ranks[8:]
    for (n1, p1), (n2, p2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_restore_computes_no_svd(monkeypatch):
    """A restore gives every layer the saved rank with placeholder factors: no SVD, whose values would be
    overwritten by model.load_state_dict anyway."""
    _, _, _, saved = _run(14, stop_at=8)

    def no_svd(*args, **kwargs):
        raise AssertionError("a restore must not compute an SVD")

    monkeypatch.setattr(oialr.linalg, "svd", no_svd)
    torch.manual_seed(1)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=3, update_every=2, cutoff=0.3))
    ctl.load_state_dict(saved["ctl"])
    assert {n: layer.rank for n, layer in ctl.lowrank_layers().items()} == saved["ctl"]["ranks"]
    model.load_state_dict(saved["model"])
    assert all(torch.equal(p, saved["model"][n]) for n, p in model.state_dict().items())


def test_wrapper_is_rebuilt_only_when_parameters_are_replaced():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    built = []
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=2, update_every=1, cutoff=0.0),
                wrap=lambda m: built.append(nn.Sequential(m)) or built[-1])
    first = ctl.wrapped_model
    assert ctl.wrapped_model is first and len(built) == 1                 # built once, on first use
    for x, y in batches((16, 16), 4, 4, seed=3):
        opt.zero_grad()
        nn.functional.cross_entropy(ctl.wrapped_model(x), y).backward()
        opt.step()
        ctl.step()
    assert ctl.phase == "low-rank" and len(built) == 2                   # the transition replaced Parameters
    assert ctl.wrapped_model is built[-1] and built[-1][0] is model      # updates at cutoff 0 keep the ranks


def test_same_seed_same_result():
    a, ranks_a, _, _ = _run(10)
    b, ranks_b, _, _ = _run(10)
    assert ranks_a == ranks_b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_load_state_dict_rejects_foreign_state():
    model = mlp()
    ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"not a state dict of OIALR version 1 \(got a dict with version None\)"):
        ctl.load_state_dict({"step": 3})
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    octl = OIALR(other, torch.optim.SGD(other.parameters(), lr=0.1), OIALRConfig(warmup_steps=1000))
    octl.transition("by hand")
    with pytest.raises(ValueError, match="converted other layers"):
        ctl.load_state_dict(octl.state_dict())


def test_load_state_dict_refuses_a_run_saved_with_other_settings():
    first = mlp()
    saved = OIALR(first, torch.optim.SGD(first.parameters(), lr=0.1), OIALRConfig(warmup_steps=5, cutoff=0.2))
    model = mlp()
    ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), OIALRConfig(warmup_steps=5, cutoff=0.3,
                                                                               exclude_modules=["2"]))
    with pytest.raises(ValueError) as err:
        ctl.load_state_dict(saved.state_dict())
    assert str(err.value) == ("the saved OIALR run was built with other settings; build it as in the saved run:\n"
                              "  cutoff: saved 0.2, here 0.3\n  exclude_modules: saved [], here ['2']")
    assert ctl.step_count == 0


def test_summary_and_table():
    model = mlp()
    ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), OIALRConfig(warmup_steps=0, cutoff=0.0,
                                                                               rank_fraction=0.5))
    s = ctl.summary()
    assert s["phase"] == "low-rank" and s["step"] == 0
    assert s["layers"]["0"]["rank"] == 8 and s["layers"]["2"]["rank"] == 12
    assert s["dense_trainable_params"] == sum(p.numel() for p in mlp().parameters())
    assert s["stored_params"] == sum(p.numel() for p in model.parameters())
    table = ctl.table().splitlines()
    assert table[0].split()[:4] == ["layer", "kind", "shape", "rank"]
    assert any(line.startswith("4 ") and "output layer" in line for line in table)
    assert any(line.startswith("0 ") and "8/16" in line for line in table)


# ---------------------------------------------------------------------------------------- automatic transition
def _auto_run(steps, state=None, stop_at=None, **auto):
    model, _, ctl, saved = _run(steps, state, stop_at, seed=2, lr=1e-2, data_seed=5, warmup_steps="auto",
                                update_every=4, auto={"every": 5, **auto})
    return model, ctl, saved


def test_auto_transition_fires_on_a_plateau_at_a_sample():
    _, ctl, _ = _auto_run(30, threshold=-0.99, window=2, epsilon=2.0, min_steps=12)
    assert ctl.transition_step == 15                       # samples at 5, 10 (first comparison), 15 >= min_steps
    assert ctl.transition_reason.startswith("network stability") and "at step 15" in ctl.transition_reason
    assert ctl.summary()["transition_reason"] == ctl.transition_reason
    assert ctl.tracker is None
    _, ctl, _ = _auto_run(30, lag=2, threshold=-0.99, window=2, epsilon=2.0,
                          min_steps=12)
    assert ctl.transition_step == 20                       # first comparison at 15 (with 5), window full at 20


def test_auto_transition_falls_back_to_max_steps():
    _, ctl, _ = _auto_run(30, threshold=1.0, epsilon=0.0, min_steps=0, max_steps=20)
    assert ctl.transition_step == 20 and ctl.transition_reason.startswith("max_steps reached")


def test_auto_transition_resumes_exactly():
    knobs = dict(threshold=-0.99, window=3, epsilon=2.0, min_steps=0)
    full, ctl_full, _ = _auto_run(30, **knobs)
    _, ctl_half, saved = _auto_run(30, stop_at=12, **knobs)
    assert ctl_half.phase == "full-rank" and saved["ctl"]["tracker"] is not None
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    resumed, ctl_resumed, _ = _auto_run(30, state=torch.load(buffer, weights_only=True), **knobs)
    assert ctl_resumed.transition_step == ctl_full.transition_step == 20   # samples 10, 15, 20 fill the window
    assert all(torch.equal(p, q) for p, q in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_fixed_warmup_reason_and_auto_mismatch_error():
    model = mlp()
    ctl = OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), OIALRConfig(warmup_steps=2))
    ctl.step()
    ctl.step()
    assert ctl.transition_reason == "warmup_steps=2 reached"
    other = mlp()
    auto = OIALR(other, torch.optim.SGD(other.parameters(), lr=0.1), OIALRConfig(warmup_steps="auto"))
    with pytest.raises(ValueError, match="warmup_steps: saved 2, here 'auto'"):
        auto.load_state_dict(ctl.state_dict())


# ---------------------------------------------------------------------------------------- seams
def test_warnings_point_at_the_callers_line():
    model = mlp()
    ctl = OIALR(model, torch.optim.Adagrad(model.parameters(), lr=0.1), OIALRConfig(warmup_steps=1))
    line = inspect.currentframe().f_lineno + 2
    with pytest.warns(UserWarning, match="does not know how to carry Adagrad") as caught:
        ctl.step()                                      # the transition, inside torch.no_grad
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_a_tracker_the_caller_steps_drives_the_automatic_transition():
    knobs = dict(threshold=-0.99, window=2, epsilon=2.0, min_steps=12)
    _, alone, _ = _auto_run(30, **knobs)
    torch.manual_seed(2)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    tracker = oialr.StabilityTracker(model, every=5, mixing=True)          # every layer, output layer included
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps="auto", update_every=4, auto={"every": 5, **knobs}),
                tracker=tracker)
    for x, y in batches((16, 16), 4, 30, seed=5):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        tracker.step()
        ctl.step()
    assert ctl.transition_step == alone.transition_step == 15 and ctl.tracker is None
    assert len(tracker.records) == 6 and "4" in tracker.records[-1]["layers"]    # it went on for the whole run
    assert ctl.state_dict()["tracker"] is None                                   # its owner saves it
    fresh = mlp()
    with pytest.raises(ValueError, match="must sample every 5 steps at lag 1.*samples every 3 at lag 1"):
        OIALR(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), OIALRConfig(warmup_steps="auto", auto={"every": 5}),
              tracker=oialr.StabilityTracker(fresh, every=3))
    with pytest.raises(ValueError, match="tracker is read only with warmup_steps=\"auto\""):
        OIALR(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), OIALRConfig(),
              tracker=oialr.StabilityTracker(fresh, every=5))
