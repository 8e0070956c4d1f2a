import pytest
import torch

from oialr import linalg


def _matrix_with_singular_values(s, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def test_svd_reconstructs_and_is_sorted():
    a = torch.randn(20, 7)
    u, s, v = linalg.svd(a)
    assert u.shape == (20, 7) and s.shape == (7,) and v.shape == (7, 7)
    assert torch.all(s[:-1] >= s[1:])
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, a, atol=1e-5, rtol=1e-5)


def test_svd_upcasts_half_precision_and_ignores_autocast():
    a = torch.randn(8, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, s, v = linalg.svd(a)
    assert u.dtype == torch.float32


def test_svd_falls_back_when_lapack_fails(monkeypatch):
    a = _matrix_with_singular_values([5.0, 3.0, 1.0], 6, 4).float()
    real_svd = torch.linalg.svd
    calls = []

    def failing_svd(x, *args, **kwargs):
        calls.append(x.dtype)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("did not converge")
        return real_svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    with pytest.warns(UserWarning, match="did not converge"):
        u, s, v = linalg.svd(a)
    assert calls == [torch.float32, torch.float64]
    torch.testing.assert_close(s[:3], torch.tensor([5.0, 3.0, 1.0]), atol=1e-5, rtol=0)


def test_svd_gram_fallback_when_every_svd_fails(monkeypatch):
    a = _matrix_with_singular_values([4.0, 2.0, 0.5], 9, 3)

    def always_fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", always_fails)
    with pytest.warns(UserWarning):
        u, s, v = linalg.svd(a)
    torch.testing.assert_close(s, torch.tensor([4.0, 2.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, a)
    with pytest.warns(UserWarning):
        u, s, v = linalg.svd(a.T.contiguous())           # wide matrix
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, a.T)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(cutoff=0.0, max_rank=5), 5),
    (dict(cutoff=0.15, max_rank=5), 3),             # 10, 5, 2 >= 1.5 ; 1, 0.5 dropped
    (dict(cutoff=0.2, max_rank=5), 3),              # 2 >= 2 is kept (only s < cutoff·s1 is dropped)
    (dict(cutoff=0.21, max_rank=5), 2),
    (dict(cutoff=0.0, max_rank=2), 2),
    (dict(cutoff=0.9, max_rank=5, min_rank=3), 3),
    (dict(cutoff=0.9, max_rank=5, current_rank=5, max_drop_fraction=0.5), 3),   # at most floor(2.5)=2 removed
    (dict(cutoff=0.9, max_rank=5, min_rank=9), 5),  # min_rank capped at len(s)
])
def test_select_rank_on_known_values(kwargs, expected):
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert linalg.select_rank(s, **kwargs) == expected


def test_select_rank_zero_matrix_keeps_one():
    assert linalg.select_rank(torch.zeros(4), cutoff=0.1, max_rank=4) == 1


def test_orthonormalize_folds_back_exactly():
    q, _ = torch.linalg.qr(torch.randn(30, 6, dtype=torch.float64))
    drifted = q + 1e-3 * torch.randn(30, 6, dtype=torch.float64)
    assert linalg.orthonormality_error(drifted) > 1e-4
    q2, r = linalg.orthonormalize(drifted)
    assert linalg.orthonormality_error(q2) < 1e-12
    torch.testing.assert_close(q2 @ r, drifted)
    assert torch.all(torch.diagonal(r) > 0)
    torch.testing.assert_close(q2, q, atol=1e-2, rtol=0)   # close to the undrifted basis, no sign flips
