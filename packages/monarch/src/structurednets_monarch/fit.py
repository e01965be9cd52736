"""The closed-form projection of a dense matrix onto Monarch matrices of a given shape.

The block pairs ``W[rows of s, cols of j]`` of a Monarch matrix are independent rank-``r``
matrices (the permutation between the factors only routes them), so the nearest Monarch matrix
in the Frobenius norm takes the truncated SVD of every block pair (Eckart-Young per block).
Without a given shape, :func:`fit_monarch` compares the block counts of
:func:`~structurednets_monarch.layout.default_candidates`, each at the largest rank the budget
allows, by the error their singular values predict, and projects onto the best.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from structurednets.plugin import check_positive_int, relative_error
from structurednets_monarch.kernels import monarch_dense
from structurednets_monarch.layout import MonarchShape, plan_monarch, rank_candidates

__all__ = ["MonarchFactors", "MonarchFit", "fit_monarch", "monarch_project"]


@dataclass(frozen=True)
class MonarchFactors:
    """The factor blocks of a Monarch matrix, laid out as :mod:`~structurednets_monarch.kernels`
    expects (``right_short``/``left_short`` are ``None`` when the sizes divide evenly)."""

    right: torch.Tensor
    right_short: torch.Tensor | None
    left: torch.Tensor
    left_short: torch.Tensor | None


@dataclass(frozen=True)
class MonarchFit:
    """A projection: the shape, the factors and the relative Frobenius error it reaches
    (the absolute error for a zero matrix)."""

    shape: MonarchShape
    factors: MonarchFactors
    relative_error: float


def _grid(matrix: torch.Tensor, rows: slice, cols: slice, q: int, k: int) -> torch.Tensor:
    """The ``q x k`` block pairs of equal size in ``matrix[rows, cols]``, as ``(q, k, l, p)``."""
    part = matrix[rows, cols]
    return part.reshape(q, part.shape[0] // q, k, part.shape[1] // k).transpose(1, 2)


def _grids(matrix: torch.Tensor, shape: MonarchShape) -> dict[tuple[int, int], torch.Tensor]:
    """The block pairs grouped by (long or short output group, long or short input block)."""
    q1, k1 = shape.nb_long_output_blocks, shape.nb_long_input_blocks
    row_split = q1 * shape.output_block_size
    col_split = k1 * shape.input_block_size
    rows = ((slice(0, row_split), q1), (slice(row_split, None), shape.nb_short_output_blocks))
    cols = ((slice(0, col_split), k1), (slice(col_split, None), shape.nb_short_input_blocks))
    return {
        (a, b): _grid(matrix, row_slice, col_slice, q, k)
        for a, (row_slice, q) in enumerate(rows)
        for b, (col_slice, k) in enumerate(cols)
        if q and k
    }


def _truncated_factors(blocks: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of shapes ``(..., l, rank)``, ``(..., rank, p)`` with ``A @ B`` the best
    rank-``rank`` approximation of each block; singular values split evenly between them."""
    U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)
    keep = min(rank, S.shape[-1])
    root = S[..., :keep].sqrt()
    A = blocks.new_zeros(*blocks.shape[:-1], rank)
    B = blocks.new_zeros(*blocks.shape[:-2], rank, blocks.shape[-1])
    A[..., :keep] = U[..., :keep] * root[..., None, :]
    B[..., :keep, :] = root[..., :, None] * Vh[..., :keep, :]
    return A, B


def monarch_project(matrix: torch.Tensor, shape: MonarchShape) -> MonarchFactors:
    """The factors of the Monarch matrix of ``shape`` nearest ``matrix`` (Frobenius norm).

    Args:
        matrix: ``(output_dim, input_dim)`` tensor (float64 for an exact projection).
        shape: the block counts and rank.
    """
    if tuple(matrix.shape) != (shape.output_dim, shape.input_dim):
        raise ValueError(
            f"matrix must have shape {(shape.output_dim, shape.input_dim)} (output_dim x "
            f"input_dim of the shape), got {tuple(matrix.shape)}"
        )
    r = shape.rank
    pairs = {key: _truncated_factors(blocks, r) for key, blocks in _grids(matrix, shape).items()}
    # B[a, b]: (q_a, k_b, r, p_b) -> R blocks of input kind b: (k_b, q r, p_b), over both a.
    # A[a, b]: (q_a, k_b, l_a, r) -> L blocks of output kind a: (q_a, l_a, k r), over both b.
    rights, lefts = [], []
    for b in (0, 1):
        parts = [pairs[(a, b)][1] for a in (0, 1) if (a, b) in pairs]
        if parts:
            stacked = torch.cat(parts, dim=0)
            rights.append(stacked.transpose(0, 1).reshape(stacked.shape[1], -1, stacked.shape[3]))
    for a in (0, 1):
        parts = [pairs[(a, b)][0] for b in (0, 1) if (a, b) in pairs]
        if parts:
            stacked = torch.cat(parts, dim=1)
            lefts.append(stacked.transpose(1, 2).reshape(stacked.shape[0], stacked.shape[2], -1))
    return MonarchFactors(
        rights[0].contiguous(),
        rights[1].contiguous() if len(rights) > 1 else None,
        lefts[0].contiguous(),
        lefts[1].contiguous() if len(lefts) > 1 else None,
    )


def _tail_energy(matrix: torch.Tensor, shapes: list[MonarchShape]) -> list[float]:
    """``||matrix - projection||_F^2`` for each shape, from the block pairs' singular values."""
    errors = []
    singular_values: dict[tuple[int, int], list[torch.Tensor]] = {}
    for shape in shapes:
        key = (shape.nb_input_blocks, shape.nb_output_blocks)
        if key not in singular_values:
            singular_values[key] = [
                torch.linalg.svdvals(blocks) for blocks in _grids(matrix, shape).values()
            ]
        errors.append(sum(float(S[..., shape.rank :].square().sum()) for S in singular_values[key]))
    return errors


def fit_monarch(
    matrix: torch.Tensor,
    budget: int,
    *,
    nb_blocks: object = None,
    rank: int | None = None,
) -> MonarchFit:
    """The Monarch matrix nearest ``matrix`` with at most ``budget`` weight scalars.

    Args:
        matrix: ``(output_dim, input_dim)`` float tensor.
        budget: the most weight scalars, ``r * (q * input_dim + k * output_dim)``.
        nb_blocks: ``k`` (both sides) or ``(k, q)``; by default every power-of-two pair is
            compared by its projection error.
        rank: the rank per block pair; by default the largest the budget allows.

    Raises:
        BudgetTooSmallError: the budget does not hold one rank-1 layout of these blocks.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise TypeError(
            f"matrix must be a 2-D torch.Tensor (output_dim x input_dim), got {matrix!r:.60}"
        )
    budget = check_positive_int("budget", budget)
    output_dim, input_dim = matrix.shape
    share = min(1.0, budget / (input_dim * output_dim))
    shapes = rank_candidates(input_dim, output_dim, share, nb_blocks, rank)
    if len(shapes) == 1:
        best = shapes[0]
    else:
        errors = _tail_energy(matrix, shapes)
        # Ties (an exact fit, the zero matrix) go to the layout a random start would take.
        slack = min(errors) * (1 + 1e-9) + 1e-20 * float(matrix.square().sum())
        tied = [s for s, e in zip(shapes, errors, strict=True) if e <= slack]
        preferred = plan_monarch(input_dim, output_dim, share, nb_blocks, rank)
        best = preferred if preferred in tied else tied[0]
    factors = monarch_project(matrix, best)
    dense = monarch_dense(
        best, factors.right, factors.right_short, factors.left, factors.left_short
    )
    return MonarchFit(best, factors, relative_error(dense, matrix))
