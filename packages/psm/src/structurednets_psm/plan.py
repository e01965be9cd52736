"""Shapes and nonzero counts of the factors of a PSM layer, shared by the layer and the count."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from structurednets.validation import (
    BudgetTooSmallError,
    check_positive_int,
    weight_budget,
)

__all__ = [
    "PSMPlan",
    "block_shapes",
    "check_block_size",
    "check_nnz_split",
    "factor_shapes",
    "plan_psm",
    "smallest_nonzeros",
    "split_nonzeros",
]


@dataclass(frozen=True)
class PSMPlan:
    """The factors of ``W = S_1 S_2 ... S_J`` (``W`` is output_dim x input_dim).

    Attributes:
        shapes: ``(rows, cols)`` of ``S_1, ..., S_J``; ``S_1`` has output_dim rows and
            ``S_J`` has input_dim columns.
        nonzeros: stored values of each factor (a multiple of ``block_size**2``).
        block_size: side of the dense blocks the supports are made of (1: single entries).
    """

    shapes: tuple[tuple[int, int], ...]
    nonzeros: tuple[int, ...]
    block_size: int = 1

    @property
    def nb_matrices(self) -> int:
        return len(self.shapes)

    @property
    def total_nonzeros(self) -> int:
        return sum(self.nonzeros)


def factor_shapes(
    input_dim: int, output_dim: int, nb_matrices: int, inner_dim: int | None = None
) -> tuple[tuple[int, int], ...]:
    """``(rows, cols)`` of each factor; every inner dimension is ``inner_dim``
    (default ``min(input_dim, output_dim)``, which keeps the rank unrestricted)."""
    nb_matrices = check_positive_int("nb_matrices", nb_matrices)
    inner = min(input_dim, output_dim) if inner_dim is None else inner_dim
    inner = check_positive_int("inner_dim", inner)
    dims = [output_dim, *([inner] * (nb_matrices - 1)), input_dim]
    return tuple((dims[j], dims[j + 1]) for j in range(nb_matrices))


def check_block_size(block_size: object, shapes: Sequence[tuple[int, int]]) -> int:
    """``block_size`` as an int that divides every dimension of the factors."""
    block_size = check_positive_int("block_size", block_size)
    dims = sorted({d for shape in shapes for d in shape})
    if any(d % block_size for d in dims):
        raise ValueError(
            f"block_size={block_size} must divide input_dim, output_dim and inner_dim "
            f"(the factors' dimensions are {dims}); pick a common divisor or block_size=1"
        )
    return block_size


def block_shapes(shapes: Sequence[tuple[int, int]], block_size: int) -> tuple[tuple[int, int], ...]:
    """The factors' shapes counted in blocks."""
    return tuple((rows // block_size, cols // block_size) for rows, cols in shapes)


def smallest_nonzeros(shapes: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Fewest nonzeros of each factor that still touch every row and every column:
    ``max(rows, cols)``."""
    return tuple(max(rows, cols) for rows, cols in shapes)


def check_nnz_split(nnz_split: object, nb_matrices: int) -> tuple[float, ...] | None:
    """``nnz_split`` as a tuple of ``nb_matrices`` positive weights, or ``None``."""
    if nnz_split is None:
        return None
    if isinstance(nnz_split, (str, bytes)) or not isinstance(nnz_split, Sequence):
        raise TypeError(
            f"nnz_split must be a sequence of {nb_matrices} positive numbers (the relative "
            f"share of the nonzeros of each factor), got {type(nnz_split).__name__}"
        )
    weights = tuple(nnz_split)
    if len(weights) != nb_matrices:
        raise ValueError(
            f"nnz_split must have one weight per factor (nb_matrices={nb_matrices}), "
            f"got {len(weights)}: {weights!r}"
        )
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"nnz_split must hold positive numbers, got {weight!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"nnz_split must hold positive finite numbers, got {weights!r}")
    return tuple(float(weight) for weight in weights)


def split_nonzeros(
    total: int,
    shapes: Sequence[tuple[int, int]],
    weights: Sequence[float] | None = None,
) -> tuple[int, ...]:
    """Share ``total`` nonzeros between the factors in proportion to ``weights`` (default
    equal), keeping each factor between its smallest count and its size.

    The counts add up to ``total`` unless the factors are too small to hold it (then each
    is full). Raises ``ValueError`` when ``total`` is below the sum of the smallest counts.
    """
    lows = smallest_nonzeros(shapes)
    highs = tuple(rows * cols for rows, cols in shapes)
    if total < sum(lows):
        raise ValueError(f"{total} nonzeros cannot cover factors that need {sum(lows)}")
    if total >= sum(highs):
        return highs
    weights = tuple(weights) if weights is not None else (1.0,) * len(shapes)

    def allocation(scale: float) -> list[float]:
        return [min(max(scale * w, lo), hi) for w, lo, hi in zip(weights, lows, highs, strict=True)]

    # The allocation grows with the scale; bisect for the scale that spends the total.
    low_scale, high_scale = 0.0, float(max(highs)) / min(weights) + 1.0
    for _ in range(200):
        middle = 0.5 * (low_scale + high_scale)
        if sum(allocation(middle)) < total:
            low_scale = middle
        else:
            high_scale = middle
    shares = allocation(high_scale)
    counts = [
        min(max(math.floor(share), lo), hi)
        for share, lo, hi in zip(shares, lows, highs, strict=True)
    ]
    # Hand out what rounding left, largest fractional part first, then trim any excess.
    order = sorted(range(len(counts)), key=lambda j: (counts[j] - shares[j], j))
    while sum(counts) < total:
        for j in order:
            if sum(counts) < total and counts[j] < highs[j]:
                counts[j] += 1
    while sum(counts) > total:
        for j in reversed(order):
            if sum(counts) > total and counts[j] > lows[j]:
                counts[j] -= 1
    return tuple(counts)


def plan_psm(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    nb_matrices: int = 2,
    inner_dim: int | None = None,
    nnz_split: Sequence[float] | None = None,
    block_size: int = 1,
) -> PSMPlan:
    """The factors of a randomly initialised PSM layer: the whole budget
    ``floor(share * input_dim * output_dim)`` shared by ``nnz_split`` (default equal), in
    whole ``block_size x block_size`` blocks.

    Raises :class:`BudgetTooSmallError` when the budget cannot give every factor one nonzero
    (block) in each of its rows and columns (of blocks).
    """
    shapes = factor_shapes(input_dim, output_dim, nb_matrices, inner_dim)
    weights = check_nnz_split(nnz_split, len(shapes))
    block_size = check_block_size(block_size, shapes)
    grid = block_shapes(shapes, block_size)
    area = block_size * block_size
    budget = weight_budget(input_dim, output_dim, nb_params_share)
    needed = sum(smallest_nonzeros(grid)) * area
    if needed > budget:
        blocks = f" of {block_size}x{block_size} blocks" if block_size > 1 else ""
        raise BudgetTooSmallError(
            "psm",
            input_dim,
            output_dim,
            nb_params_share,
            needed,
            f"{len(shapes)} sparse factor(s) {' x '.join(f'({r}x{c})' for r, c in shapes)}"
            f"{blocks} with a nonzero in every row and column",
        )
    blocks = split_nonzeros(budget // area, grid, weights)
    return PSMPlan(shapes, tuple(count * area for count in blocks), block_size)
