"""The low-rank fit: the truncated SVD, or its exact weighted form with calibration."""

from __future__ import annotations

import torch

from structurednets.calibration import InputStatistics
from structurednets.plugin import balanced_truncated_svd

__all__ = ["fit_lowrank"]


def fit_lowrank(
    matrix: torch.Tensor, rank: int, input_statistics: InputStatistics | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)``, shapes ``(rows, rank)`` and ``(rank, cols)``, of the best rank-``rank``
    approximation ``L @ R`` of ``matrix``.

    Without statistics: the truncated SVD (Eckart-Young, Frobenius and spectral norms), the
    singular values split evenly between the factors. With ``input_statistics`` (whitening
    factor ``S``, symmetric and invertible): the minimiser of ``||(matrix - L R) S||_F``,
    ``L R = [matrix S]_rank S^{-1}`` - the truncated SVD of the whitened matrix mapped back
    (``A -> A S`` is a bijection on rank-``rank`` matrices), so ``R = sqrt(Sigma) V^T S^{-1}``.
    """
    if input_statistics is None:
        return balanced_truncated_svd(matrix, rank)
    factor = input_statistics.whitening_factor().to(matrix.dtype)
    inverse = input_statistics.inverse_whitening_factor().to(matrix.dtype)
    left, right = balanced_truncated_svd(matrix @ factor, rank)
    return left, right @ inverse
