"""The calibrated low-rank fit: the exact optimum of ||(W - L R) S||_F over rank r."""

import numpy as np
import pytest
import torch

from structurednets import approximate
from structurednets.calibration import InputStatistics
from structurednets_lowrank import LRLayer


def inputs(n, d, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * np.linspace(0.05, 4, d)


def optimum_by_cholesky(W, C, rank):
    """Independent: with C = G G^T (Cholesky), the optimum is [W G]_r G^{-1} (numpy)."""
    G = np.linalg.cholesky(C)
    U, s, Vt = np.linalg.svd(W @ G)
    best = (U[:, :rank] * s[:rank]) @ Vt[:rank]
    return np.linalg.solve(G.T, best.T).T


def optimum_by_projection(W, C, rank):
    """Independent: the optimum is P W with P the projector on the top eigenvectors of W C W^T."""
    _, vectors = np.linalg.eigh(W @ C @ W.T)
    top = vectors[:, -rank:]
    return top @ top.T @ W


def output_error(A, W, C):
    E = W - A
    return np.sqrt(np.trace(E @ C @ E.T) / np.trace(W @ C @ W.T))


@pytest.mark.parametrize("shape,rank", [((12, 9), 3), ((7, 15), 2), ((20, 20), 6)])
def test_weighted_fit_is_the_exact_optimum(shape, rank):
    W = np.random.default_rng(0).standard_normal(shape)
    X = inputs(300, shape[1], 1)
    stats = InputStatistics(shape[1], damping=0.0).update(X)
    C = X.T @ X / len(X)
    share = rank * sum(shape) / (shape[0] * shape[1])
    result = approximate(W, "lowrank", share, inputs=stats, dtype=torch.float64)
    assert result.layer.rank == rank
    A = result.layer.to_dense().detach().numpy()
    for reference in (optimum_by_cholesky(W, C, rank), optimum_by_projection(W, C, rank)):
        np.testing.assert_allclose(A, reference, rtol=1e-6, atol=1e-8)
    expected = np.linalg.norm((W - A) @ X.T) / np.linalg.norm(W @ X.T)
    assert result.output_relative_error == pytest.approx(expected, rel=1e-9)
    plain = approximate(W, "lowrank", share, dtype=torch.float64).layer.to_dense().detach().numpy()
    assert output_error(A, W, C) < output_error(plain, W, C) - 1e-3


def test_brute_force_on_a_small_case():
    """Rank 1 of a 3 x 2 matrix: W~ = u v^T; search v over a fine grid of directions and
    take the best u for each in closed form."""
    rng = np.random.default_rng(2)
    W = rng.standard_normal((3, 2))
    C = np.array([[3.0, 1.2], [1.2, 0.7]])
    stats = InputStatistics.from_covariance(C, damping=0.0)
    fit = approximate(W, "lowrank", 5 / 6, input_covariance=C, damping=0.0, dtype=torch.float64)
    assert fit.layer.rank == 1
    best = np.inf
    for angle in np.linspace(0, np.pi, 20001):
        v = np.array([np.cos(angle), np.sin(angle)])
        u = W @ C @ v / (v @ C @ v)  # the best u for this v
        best = min(best, output_error(np.outer(u, v), W, C))
    got = stats.output_error(fit.layer.to_dense().detach(), torch.from_numpy(W))
    assert got <= best + 1e-9 and got == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_never_worse_than_the_weight_svd(seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((16, 24))
    X = inputs(10 + 7 * seed, 24, seed)  # fewer samples than input_dim: singular moment
    for damping in (0.0, 0.01, 1.0):
        fit = approximate(W, "lowrank", 0.2, inputs=X, damping=damping)
        plain = approximate(W, "lowrank", 0.2, inputs=X, refinement_iterations=0, damping=damping)
        stats = InputStatistics(24).update(X)
        svd = stats.output_error(
            approximate(W, "lowrank", 0.2).layer.to_dense().detach(), torch.from_numpy(W)
        )
        assert fit.output_relative_error <= svd * (1 + 1e-5)
        assert plain.output_relative_error == pytest.approx(fit.output_relative_error)
        assert torch.isfinite(fit.layer.to_dense()).all()


def test_degenerate_moments_give_finite_layers():
    W = np.random.default_rng(3).standard_normal((8, 6))
    for X in (np.zeros((3, 6)), np.outer(np.ones(4), np.arange(6.0))):
        for damping in (0.0, 0.01):
            fit = approximate(W, "lowrank", 0.5, inputs=X, damping=damping)
            assert torch.isfinite(fit.layer.to_dense()).all()
            assert np.isfinite(fit.output_relative_error)


def test_layer_argument_checks():
    stats = InputStatistics(6).update(np.ones((2, 6)))
    with pytest.raises(TypeError, match="input_statistics must be"):
        LRLayer(6, 4, 0.5, initial_weight_matrix=np.ones((4, 6)), input_statistics=np.eye(6))
    with pytest.raises(ValueError, match="input_statistics has input_dim=6"):
        LRLayer(5, 4, 0.5, initial_weight_matrix=np.ones((4, 5)), input_statistics=stats)
    with pytest.raises(ValueError, match="needs an initial_weight_matrix"):
        LRLayer(6, 4, 0.5, input_statistics=stats)
