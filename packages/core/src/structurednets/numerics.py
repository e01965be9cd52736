"""Numerical helpers that every structure's fit uses: one copy here, not one per plugin."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "balanced_factors",
    "balanced_truncated_svd",
    "largest_count_within",
    "relative_error",
    "torch_threads",
]


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``, restoring the previous count.

    ``None`` leaves the count as it is.
    """
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def balanced_truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)``, shapes ``(rows, rank)`` and ``(rank, cols)``, with ``L @ R`` the best
    rank-``rank`` approximation of ``matrix`` (Eckart-Young).

    The singular values are split evenly (``L = U sqrt(S)``, ``R = sqrt(S) V^T``) so that both
    factors have the same scale, which keeps gradient steps balanced. Ranks above
    ``min(matrix.shape)`` are padded with zero columns and rows. Same dtype and device as
    ``matrix``.
    """
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return balanced_factors(U, S, Vh, rank)


def balanced_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U sqrt(S), sqrt(S) V^T)`` of the ``rank`` leading triplets of an SVD already known
    (``U``: ``(rows, k)``, ``S``: ``(k,)``, ``Vh``: ``(k, cols)``); ranks above ``k`` are padded
    with zero columns and rows."""
    keep = min(rank, S.numel())
    root = S[:keep].sqrt()
    left = U.new_zeros(U.shape[0], rank)
    right = Vh.new_zeros(rank, Vh.shape[1])
    left[:, :keep] = U[:, :keep] * root
    right[:keep] = root[:, None] * Vh[:keep]
    return left, right


def largest_count_within(budget: int, per_unit: int, fixed: int = 0) -> int:
    """The largest ``k >= 0`` with ``fixed + k * per_unit <= budget`` (e.g. the largest rank
    whose ``rank * (rows + cols)`` scalars fit a budget)."""
    if per_unit < 1:
        raise ValueError(f"per_unit must be a positive int, got {per_unit!r}")
    return max(0, (budget - fixed) // per_unit)


def relative_error(approximation: torch.Tensor, target: torch.Tensor) -> float:
    """``||approximation - target||_F / ||target||_F`` in float64 (the absolute error if
    ``target`` is all zeros)."""
    approximation = approximation.detach().to(device="cpu", dtype=torch.float64)
    target = torch.as_tensor(target).detach().to(device="cpu", dtype=torch.float64)
    error = float(torch.linalg.norm(approximation - target))
    norm = float(torch.linalg.norm(target))
    return error / norm if norm > 0 else error
