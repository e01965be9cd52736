"""The calibrated PSM fit: PALM against W S with the whitening factor S as a fixed factor."""

import numpy as np
import pytest
import torch

from structurednets import approximate
from structurednets.calibration import InputStatistics
from structurednets_psm import PALMSettings, PSMLayer
from structurednets_psm.fit.weighted import weighted_factorization

SHORT = PALMSettings(max_sweeps=200, unstructured_share=1.0)  # the whole budget on these random W


def problem(seed=0, shape=(16, 24), n=200):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape)
    X = rng.standard_normal((n, shape[1])) * np.geomspace(0.02, 5, shape[1])
    return W, X, InputStatistics(shape[1]).update(X)


def output_error(dense, W, X):
    return np.linalg.norm((W - dense) @ X.T) / np.linalg.norm(W @ X.T)


@pytest.mark.parametrize("block_size", [1, 2])
def test_weighted_palm_lowers_the_output_error(block_size):
    W, X, stats = problem()
    layer = PSMLayer(24, 16, 0.4, False, W, block_size=block_size, palm_settings=SHORT)
    start = layer.fit
    refit = weighted_factorization(start, torch.from_numpy(W), stats, block=block_size)
    before = output_error(np.linalg.multi_dot([f.numpy() for f in start.factors]), W, X)
    after = output_error(np.linalg.multi_dot([f.numpy() for f in refit.factors]), W, X)
    assert after < 0.9 * before
    for factor, support, old in zip(refit.factors, refit.supports, start.supports, strict=True):
        assert not factor[~support].any()  # zero off the support
        assert int(support.sum()) <= int(old.sum())  # never more nonzeros than the budget gave
    product = np.linalg.multi_dot([f.numpy() for f in refit.factors])
    assert refit.relative_error == pytest.approx(np.linalg.norm(W - product) / np.linalg.norm(W))


def test_calibrated_layer_matches_its_factors_and_budget():
    W, X, stats = problem(seed=1)
    plain = approximate(W, "psm", 0.4, palm_settings=SHORT)
    fit = approximate(W, "psm", 0.4, inputs=stats, dtype=torch.float64, palm_settings=SHORT)
    assert fit.layer.nb_weight_parameters <= fit.layer.weight_budget
    assert fit.output_relative_error <= output_error(
        plain.layer.to_dense().detach().double().numpy(), W, X
    )
    dense = fit.layer.to_dense().detach().numpy()
    assert fit.output_relative_error == pytest.approx(output_error(dense, W, X), rel=1e-9)
    U = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(fit.layer(U), U @ fit.layer.to_dense().T)


def test_input_statistics_argument_checks():
    W, _, stats = problem()
    with pytest.raises(TypeError, match="input_statistics must be"):
        PSMLayer(24, 16, 0.4, initial_weight_matrix=W, input_statistics=np.eye(24))
    with pytest.raises(ValueError, match="input_statistics needs an initial_weight_matrix"):
        PSMLayer(24, 16, 0.4, input_statistics=stats)


def test_weighted_error_from_the_second_moment_matches_the_whitened_residual():
    """The sweeps work from C = S S and W C; their error must be ||(P - W) S||_F^2."""
    from structurednets_psm.fit.weighted import _Weighted

    W, _, stats = problem(seed=2, shape=(10, 14))
    W = torch.from_numpy(W)
    generator = torch.Generator().manual_seed(0)
    factors = [torch.randn(10, 10, generator=generator, dtype=torch.float64) for _ in range(2)]
    factors[1] = torch.randn(10, 14, generator=generator, dtype=torch.float64)
    S = stats.whitening_factor()
    weighted = _Weighted(W, stats.damped_covariance())
    residual = (factors[0] @ factors[1] - W) @ S
    assert weighted.squared_error(factors) == pytest.approx(float((residual**2).sum()), rel=1e-10)
    gram, target_right = weighted.right_terms(factors, 0)
    right = factors[1] @ S
    torch.testing.assert_close(gram, right @ right.T)
    torch.testing.assert_close(target_right, (W @ S) @ right.T)
