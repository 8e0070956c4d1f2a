import pytest
import torch
from torch import nn

from oialr import OIALRConfig, factorize, linalg
from oialr.factorize import BasisUpdate, basis_update, stored_params, transition_factors
from oialr.targets import layer_weight


def _spectrum_matrix(s, m=9, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def test_transition_factors_keep_the_values_over_the_cutoff_in_the_weights_dtype():
    w = _spectrum_matrix([4.0, 2.0, 1.0, 0.3, 0.1, 0.01]).float()
    U, S, V = transition_factors(w, OIALRConfig(cutoff=0.2))
    assert U.shape == (9, 3) and S.shape == (3, 3) and V.shape == (6, 3) and S.dtype == torch.float32
    torch.testing.assert_close(torch.diagonal(S), torch.tensor([4.0, 2.0, 1.0]), atol=1e-5, rtol=0)
    assert transition_factors(w, OIALRConfig(cutoff=0.2), rank=5).S.shape == (5, 5)
    assert transition_factors(w, OIALRConfig(cutoff=0.0, rank_fraction=0.5)).S.shape == (3, 3)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 6\] for a \(9, 6\) weight, got 0"):
        transition_factors(w, OIALRConfig(), rank=0)


def test_basis_update_rotates_without_changing_the_product_and_returns_the_rotations():
    U, S, V = transition_factors(_spectrum_matrix([3.0, 2.0, 1.0, 0.5]), OIALRConfig(), rank=4)
    mixed = S + 0.3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=S.dtype)
    update = basis_update(U, mixed, V, OIALRConfig(cutoff=0.0))
    assert isinstance(update, BasisUpdate) and update.u.shape == update.v.shape == (4, 4)
    torch.testing.assert_close(update.U @ update.S @ update.V.T, U @ mixed @ V.T)
    assert torch.count_nonzero(update.S - torch.diag(torch.diagonal(update.S))) == 0      # diagonal again
    assert linalg.orthonormality_error(update.U) < 1e-12 and update.factors == (update.U, update.S, update.V)
    cut = basis_update(U, mixed, V, OIALRConfig(cutoff=0.9))
    assert cut.S.shape[0] < 4 and cut.u.shape == (4, 4)                 # rotations keep the old rank


def test_basis_update_reorthonormalizes_a_drifted_basis_without_changing_the_product():
    U, S, V = transition_factors(_spectrum_matrix([3.0, 2.0, 1.0]), OIALRConfig(), rank=3)
    drifted = U @ (torch.eye(3, dtype=U.dtype) + 1e-3 * torch.ones(3, 3, dtype=U.dtype))
    update = basis_update(drifted, S, V, OIALRConfig(cutoff=0.0))
    assert linalg.orthonormality_error(update.U) < 1e-12
    torch.testing.assert_close(update.U @ update.S @ update.V.T, drifted @ S @ V.T)


def test_stored_params_counts_all_three_factors():
    assert stored_params(32, 16, 4) == 4 * 32 + 4 * 4 + 16 * 4
    assert factorize.stored_params(5, 5, 5) == 75


def test_layer_weight_resolves_linear_conv_attention_and_factored_layers():
    model = nn.Sequential(nn.Linear(4, 8), nn.Conv1d(2, 3, 3), nn.MultiheadAttention(8, 2),
                          nn.MultiheadAttention(8, 2, kdim=5, vdim=5))
    assert layer_weight(model, "0") == (model[0], model[0].weight)
    assert layer_weight(model, "1")[1] is model[1].weight
    assert layer_weight(model, "2.in_proj") == (model[2], model[2].in_proj_weight)
    assert layer_weight(model, "2.out_proj")[1] is model[2].out_proj.weight
    assert layer_weight(model, "3.k_proj")[1] is model[3].k_proj_weight
    from oialr.convert import convert_layer
    _, layer = convert_layer(model, "0", rank=2)
    assert layer_weight(model, "0") == (layer, layer.lowrank_S)
    with pytest.raises(ValueError, match="layer .2.q_proj.: expected a layer of a registered type.*found nothing"):
        layer_weight(model, "2.q_proj")
