"""Kit checks of the calibrated fit (``approximate(..., inputs=X)``) of any structure."""

from __future__ import annotations

import numpy as np
import torch

from structurednets.approximation import approximate
from structurednets.calibration import InputStatistics, output_relative_error
from structurednets.testing.case import ConformanceCase

__all__ = ["check_calibrated_fit"]


def _calibration_inputs(input_dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    mixing = rng.standard_normal((input_dim, input_dim)) * np.geomspace(0.02, 3, input_dim)
    # fewer samples than input_dim, and half the inputs never fire (dead ReLUs)
    few = rng.standard_normal((max(1, input_dim // 3), input_dim))
    few[:, ::2] = 0.0
    return {
        "correlated": rng.standard_normal((200, input_dim)) @ mixing,
        "dead inputs, fewer samples than input_dim": few,
        "all zero": np.zeros((5, input_dim)),
    }


def check_calibrated_fit(case: ConformanceCase) -> None:
    """Fitted with ``inputs=X``, a layer is finite, reports its output error on ``X``
    correctly, and is no worse than the weight fit in the damped output error it minimises,
    for correlated, rank-deficient and all-zero inputs."""
    input_dim, output_dim = case.shape
    target = np.random.default_rng(12).standard_normal((output_dim, input_dim))
    W = torch.from_numpy(target)
    kwargs = dict(dtype=torch.float64, **case.options)
    plain = approximate(target, case.structure, case.share, **kwargs).layer.to_dense().detach()
    for name, X in _calibration_inputs(input_dim).items():
        stats = InputStatistics(input_dim).update(X)
        fit = approximate(target, case.structure, case.share, inputs=stats, **kwargs)
        dense = fit.layer.to_dense().detach()
        assert torch.isfinite(dense).all(), f"{name}: non-finite calibrated weights"
        assert fit.layer.nb_weight_parameters <= fit.layer.weight_budget, f"{name}: over budget"
        moment = torch.from_numpy(X.T @ X / len(X))
        expected = output_relative_error(dense, W, moment)
        assert abs(fit.output_relative_error - expected) <= 1e-9 * max(1.0, expected), (
            f"{name}: reported output error {fit.output_relative_error:.6g}, "
            f"recomputed {expected:.6g}"
        )
        damped = stats.damped_covariance()
        calibrated_error = output_relative_error(dense, W, damped)
        weight_error = output_relative_error(plain, W, damped)
        assert calibrated_error <= weight_error * (1 + 1e-6) + 1e-12, (
            f"{name}: calibrated fit has damped output error {calibrated_error:.6g}, worse "
            f"than the weight fit's {weight_error:.6g}"
        )
