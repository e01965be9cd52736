"""Input statistics, the generic refinement and calibrated approximate(), on test structures."""

import numpy as np
import pytest
import torch

from structurednets import approximate
from structurednets.calibration import (
    InputStatistics,
    as_input_statistics,
    output_relative_error,
)
from structurednets.refinement import input_weighting, refine_to_inputs


def correlated_inputs(n=400, d=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * np.linspace(0.1, 3, d)


def test_streaming_moment_matches_all_at_once():
    X = correlated_inputs(n=10000, d=7)
    stats = InputStatistics(7)
    for chunk in np.array_split(X, 7):
        stats.update(chunk.astype(np.float32) if len(chunk) % 2 else torch.from_numpy(chunk))
    assert stats.nb_samples == 10000
    expected = X.T @ X / len(X)
    np.testing.assert_allclose(stats.covariance.numpy(), expected, rtol=1e-5)
    # batches of shape (..., d) count every row
    stats3 = InputStatistics(7).update(torch.from_numpy(X).reshape(100, 100, 7))
    np.testing.assert_allclose(stats3.covariance.numpy(), expected, rtol=1e-12)


def test_float32_inputs_accumulate_in_float64():
    # a large constant offset: float32 accumulation of x x^T loses the small variations
    X = (1000 + np.random.default_rng(1).standard_normal((20000, 3))).astype(np.float32)
    stats = InputStatistics(3).update(X)
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(stats.covariance.numpy(), X64.T @ X64 / len(X), rtol=1e-13)


def test_damped_whitening_factor():
    X = correlated_inputs(d=6)
    stats = InputStatistics(6, damping=0.1).update(X)
    C = X.T @ X / len(X)
    damped = C + 0.1 * np.trace(C) / 6 * np.eye(6)
    S = stats.whitening_factor().numpy()
    np.testing.assert_allclose(S, S.T, atol=1e-12)
    np.testing.assert_allclose(S @ S, damped, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(S @ stats.inverse_whitening_factor().numpy(), np.eye(6), atol=1e-9)


@pytest.mark.parametrize(
    "X",
    [
        np.zeros((5, 6)),  # all-zero
        np.outer(np.ones(3), np.arange(6.0)),  # rank 1
        np.hstack([np.random.default_rng(2).standard_normal((40, 3)), np.zeros((40, 3))]),
        np.random.default_rng(3).standard_normal((2, 6)),  # fewer samples than input_dim
    ],
)
@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_singular_moments_give_finite_factors(X, damping):
    stats = InputStatistics(6, damping=damping).update(X)
    S, inverse = stats.whitening_factor(), stats.inverse_whitening_factor()
    assert torch.isfinite(S).all() and torch.isfinite(inverse).all()
    assert torch.linalg.matrix_rank(S) == 6


def test_output_relative_error_against_inputs():
    rng = np.random.default_rng(4)
    X, W, A = correlated_inputs(d=5), rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    C = torch.from_numpy(X.T @ X / len(X))
    expected = np.linalg.norm((W - A) @ X.T) / np.linalg.norm(W @ X.T)
    got = output_relative_error(torch.from_numpy(A), torch.from_numpy(W), C)
    assert got == pytest.approx(expected, rel=1e-10)


def test_covariance_checks_name_the_argument():
    good = np.eye(4)
    with pytest.raises(ValueError, match="input_covariance must be a square"):
        as_input_statistics(4, input_covariance=np.ones((4, 3)))
    with pytest.raises(ValueError, match="input_covariance must be symmetric"):
        as_input_statistics(4, input_covariance=np.triu(np.ones((4, 4))))
    with pytest.raises(ValueError, match="positive semi-definite"):
        as_input_statistics(4, input_covariance=-good)
    with pytest.raises(ValueError, match=r"input_covariance must have shape \(input_dim"):
        as_input_statistics(5, input_covariance=good)
    with pytest.raises(ValueError, match="input_covariance must be finite"):
        as_input_statistics(4, input_covariance=good * np.nan)
    with pytest.raises(TypeError, match="input_covariance must hold floating"):
        as_input_statistics(4, input_covariance=np.eye(4, dtype=int))
    with pytest.raises(ValueError, match="either inputs or input_covariance"):
        as_input_statistics(4, np.ones((3, 4)), good)
    # round-off: a float32 moment, slightly asymmetric and slightly indefinite, is accepted
    X = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    C = X.T @ X / 3
    C[0, 1] += 1e-7
    C -= 1e-8 * np.eye(4, dtype=np.float32)
    stats = as_input_statistics(4, input_covariance=C)
    assert torch.linalg.eigvalsh(stats.covariance).min() >= -1e-12
    with pytest.raises(ValueError, match="cannot take samples"):
        stats.update(X)


def test_input_checks_name_the_argument():
    with pytest.raises(ValueError, match=r"inputs must have shape \(n_samples, input_dim=4\)"):
        as_input_statistics(4, inputs=np.ones((3, 5)))
    with pytest.raises(TypeError, match="inputs must hold floating"):
        as_input_statistics(4, inputs=np.ones((3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="inputs must be a floating-point tensor"):
        as_input_statistics(4, inputs=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="inputs must be finite"):
        as_input_statistics(4, inputs=np.full((3, 4), np.inf))
    with pytest.raises(ValueError, match="at least one sample"):
        as_input_statistics(4, inputs=np.ones((0, 4)))
    with pytest.raises(TypeError, match="inputs must be a numpy array"):
        as_input_statistics(4, inputs=[[1.0] * 4])
    stats = InputStatistics(4)
    with pytest.raises(ValueError, match="finite"):
        stats.update(np.array([[1.0, 2.0, np.nan, 0.0]]))
    assert stats.nb_samples == 0  # a bad batch leaves the statistics unchanged


def best_diagonal(W, C):
    """Independent: row i of ||(W - D) S||^2 is a 1-D quadratic in d_i."""
    size = min(W.shape)
    WC = W @ C
    return np.array([WC[i, i] / C[i, i] for i in range(size)])


def test_refinement_reaches_the_weighted_diagonal_optimum(diagonal_structure):
    rng = np.random.default_rng(6)
    W, X = rng.standard_normal((12, 9)), correlated_inputs(d=9)
    stats = InputStatistics(9, damping=0.0).update(X)
    assert input_weighting(diagonal_structure.layer_class) is None
    weight_fit = approximate(W, "diagonal", 0.5, dtype=torch.float64)
    result = approximate(W, "diagonal", 0.5, inputs=stats, dtype=torch.float64)
    C = X.T @ X / len(X)
    expected = best_diagonal(W, C)
    np.testing.assert_allclose(result.layer.diagonal.detach().numpy(), expected, rtol=1e-6)
    dense = np.zeros_like(W)
    np.fill_diagonal(dense, expected)
    reference = np.linalg.norm((W - dense) @ X.T) / np.linalg.norm(W @ X.T)
    assert result.output_relative_error == pytest.approx(reference, rel=1e-6)
    assert result.output_relative_error < weight_fit_output(weight_fit, W, X) - 1e-3
    assert weight_fit.output_relative_error is None
    assert "output error" in str(result)


def weight_fit_output(result, W, X):
    dense = result.layer.to_dense().detach().double().numpy()
    return np.linalg.norm((W - dense) @ X.T) / np.linalg.norm(W @ X.T)


def test_refinement_never_worse_and_keeps_the_bias(diagonal_structure):
    rng = np.random.default_rng(7)
    W, bias = rng.standard_normal((6, 6)), rng.standard_normal(6)
    stats = InputStatistics(6).update(correlated_inputs(d=6))
    result = approximate(W, "diagonal", 0.5, bias=bias, inputs=stats, dtype=torch.float32)
    np.testing.assert_allclose(result.layer.bias.detach().numpy(), bias, rtol=1e-6)
    assert result.layer.diagonal.dtype == torch.float32
    # refining an optimum again: best iterate kept, error does not rise
    before = stats.output_error(result.layer.to_dense().detach(), torch.from_numpy(W))
    refinement = refine_to_inputs(result.layer, torch.from_numpy(W), stats)
    after = stats.output_error(result.layer.to_dense().detach(), torch.from_numpy(W))
    assert refinement.error <= refinement.start_error
    assert after <= before * (1 + 1e-6)


@pytest.mark.parametrize("X", [np.zeros((4, 9)), np.outer(np.ones(2), np.arange(9.0))])
def test_degenerate_inputs_give_finite_layers(diagonal_structure, X):
    W = np.random.default_rng(8).standard_normal((12, 9))
    result = approximate(W, "diagonal", 0.5, inputs=X)
    assert torch.isfinite(result.layer.to_dense()).all()
    assert np.isfinite(result.output_relative_error)


def test_without_calibration_nothing_changes(diagonal_structure):
    W = np.random.default_rng(9).standard_normal((12, 9))
    plain = approximate(W, "diagonal", 0.5)
    no_refinement = approximate(
        W, "diagonal", 0.5, inputs=correlated_inputs(), refinement_iterations=0
    )
    torch.testing.assert_close(plain.layer.to_dense(), no_refinement.layer.to_dense())
    with pytest.raises(ValueError, match="refinement_iterations"):
        approximate(W, "diagonal", 0.5, inputs=correlated_inputs(), refinement_iterations=-1)
    with pytest.raises(ValueError, match=r"inputs must have shape \(n_samples, input_dim=9\)"):
        approximate(W, "diagonal", 0.5, inputs=np.ones((3, 12)))


def test_choosing_with_calibration_refines_only_the_chosen_structure_fully(
    diagonal_structure, monkeypatch
):
    """Every structure gets SCREENING_ITERATIONS of the refinement, the chosen one the rest
    of refinement_iterations; the others keep their screened layers in ``tried``."""
    from full_structure import FullLayer, full_nb_weight_parameters

    import structurednets
    import structurednets.approximation as approximation

    calls = []
    real = approximation.refine_to_inputs

    def recording(layer, target, statistics, *, max_iterations):
        calls.append((layer.structure_name, max_iterations))
        return real(layer, target, statistics, max_iterations=max_iterations)

    monkeypatch.setattr(approximation, "refine_to_inputs", recording)
    structurednets.register("full", FullLayer, full_nb_weight_parameters)
    try:
        rng = np.random.default_rng(9)
        W, X = rng.standard_normal((12, 9)), correlated_inputs(d=9)
        W[:9, :9] += 5 * np.eye(9)  # the diagonal part dominates: both structures fit well
        result = approximate(
            W, ["diagonal", "full"], 1.0, inputs=X, refinement_iterations=40, dtype=torch.float64
        )
    finally:
        structurednets.unregister("full")
    screening = approximation.SCREENING_ITERATIONS
    assert calls[:2] == [("diagonal", screening), ("full", screening)]
    assert calls[2:] == [(result.structure, 40 - screening)]
    assert result.structure == "full"  # holds W exactly at share 1
    assert result.output_relative_error < 1e-6
    screened = next(each for each in result.tried if each.structure == "diagonal")
    assert screened.output_relative_error > 0.05
    assert [each.structure for each in result.tried] == ["diagonal", "full"]
