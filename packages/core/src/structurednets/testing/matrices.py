"""Matrices and reference errors that structures' tests share."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["best_low_rank_error", "layer_relative_error", "smooth_kernel"]


def smooth_kernel(rows: int, cols: int, decay: float = 1.0) -> np.ndarray:
    """``1 / (1 + decay * |i - j|)`` on index grids, shape ``(rows, cols)``, float64: a
    Toeplitz matrix whose off-diagonal blocks have quickly decaying singular values."""
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    return 1.0 / (1.0 + decay * np.abs(i - j))


def best_low_rank_error(matrix: object, rank: int) -> float:
    """The relative Frobenius error of the best rank-``rank`` approximation (Eckart-Young):
    ``sqrt(sum of the squared singular values past rank) / ||matrix||_F``."""
    singular = torch.linalg.svdvals(torch.as_tensor(matrix, dtype=torch.float64))
    total = float(singular.square().sum())
    return float(singular[rank:].square().sum() / total) ** 0.5 if total > 0 else 0.0


def layer_relative_error(layer: torch.nn.Module, target: object) -> float:
    """``||layer.to_dense() - target||_F / ||target||_F`` in float64."""
    from structurednets.numerics import relative_error

    with torch.no_grad():
        return relative_error(layer.to_dense(), torch.as_tensor(target))
