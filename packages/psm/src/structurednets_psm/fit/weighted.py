"""The calibrated PSM fit: PALM on ``W S ~ S_1 ... S_J S`` with ``S`` a fixed extra factor.

``S`` is the whitening factor of the layer's input statistics (``S S = C + lambda I``), so
``||W S - S_1 ... S_J S||_F`` is the output error of the product. Starting from the weight
fit's factors, each sweep takes a projected gradient step on every sparse factor in turn
(step ``1 / (1.01 ||L||_2^2 ||R S||_2^2)``, the inverse Lipschitz constant, ``L`` and ``R``
the products left and right of it, their spectral norms by the weight fit's warm-started
power iterations (:class:`~structurednets_psm.fit.palm.Numerics`; an exact SVD per step
was half of the fit's time); the projection keeps the factor's own number of largest
entries, so supports may move), then solves the first factor's values exactly on its
support (its rows are independent least-squares problems). The best point in the weighted
error is kept, so the result is never worse than the weight fit.
"""

from __future__ import annotations

import math

import torch

from structurednets.calibration import InputStatistics
from structurednets_psm.fit.hierarchical import Factorization
from structurednets_psm.fit.least_squares import rows_least_squares
from structurednets_psm.fit.palm import DTYPE, Numerics, chain_product
from structurednets_psm.fit.projections import project

__all__ = ["WEIGHTED_SWEEPS", "weighted_factorization"]

#: PALM sweeps of the calibrated fit.
WEIGHTED_SWEEPS = 60
#: Over the power iterations' estimate (a lower bound) of the Lipschitz constant.
_MARGIN = 1.01
#: Warm-started power iterations per spectral norm, as in the weight fit's search.
_POWER_ITERATIONS = 4


def _error(factors: list[torch.Tensor], whitening: torch.Tensor, target: torch.Tensor) -> float:
    residual = chain_product(factors) @ whitening - target
    return float(torch.linalg.norm(residual))


def weighted_factorization(
    fit: Factorization,
    matrix: torch.Tensor,
    statistics: InputStatistics,
    *,
    nb_sweeps: int = WEIGHTED_SWEEPS,
    block: int = 1,
) -> Factorization:
    """Refit ``fit`` (a weight fit of ``matrix``, ``(output_dim, input_dim)``) in the output
    error of ``statistics``; factors keep their shapes and numbers of nonzeros (in whole
    ``block x block`` blocks). Returns a new :class:`Factorization` whose ``relative_error``
    is the weight error of the new product."""
    whitening = statistics.whitening_factor().to(DTYPE)
    matrix = matrix.detach().to(dtype=DTYPE)
    target = matrix @ whitening
    factors = [factor.clone() for factor in fit.factors]
    supports = [support.clone() for support in fit.supports]
    nonzeros = [int(support.sum()) for support in supports]
    best_error = _error(factors, whitening, target)
    best = ([f.clone() for f in factors], [s.clone() for s in supports])
    count = len(factors)
    norms = Numerics(torch.Generator().manual_seed(0), _POWER_ITERATIONS)
    for _ in range(nb_sweeps):
        for j in range(count):
            left = chain_product(factors[:j])
            right = chain_product(factors[j + 1 :])
            right = whitening if right is None else right @ whitening
            middle = factors[j] if left is None else left @ factors[j]
            residual = middle @ right - target
            gradient = residual @ right.T
            gradient = gradient if left is None else left.T @ gradient
            step = _MARGIN * norms.squared(left, (j, "left")) * norms.squared(right, (j, "right"))
            if step <= 0 or not math.isfinite(step):
                continue
            moved = factors[j] - gradient / step
            _, support = project(moved, nonzeros[j], "global", None, block)
            factors[j], supports[j] = moved * support, support
        right = chain_product(factors[1:])
        right = whitening if right is None else right @ whitening
        first = rows_least_squares(target, right, supports[0])
        if first is not None:
            factors[0] = first
        error = _error(factors, whitening, target)
        if not math.isfinite(error):
            break
        if error < best_error:
            best_error = error
            best = ([f.clone() for f in factors], [s.clone() for s in supports])
    factors, supports = best
    product = chain_product(factors)
    norm = float(torch.linalg.norm(matrix))
    weight_error = float(torch.linalg.norm(matrix - product))
    return Factorization(
        factors=factors,
        supports=supports,
        relative_error=weight_error / norm if norm > 0 else weight_error,
        strategy=fit.strategy,
        nb_updates=fit.nb_updates + nb_sweeps * count,
        tried=fit.tried,
    )
