"""The sizes of a PSM layer: the factors' shapes and how many values each support holds.

A layer's sizes are everything that fixes the shapes of its parameters and buffers; they are
its ``layout_sizes()`` (``factor_shapes``, ``nonzeros``, ``block_size``) and the options that
rebuild them. :func:`layer_sizes` resolves the constructor's options into :class:`FactorSizes`
for a layer without a matrix to fit; the layer and the registered parameter count share it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from structurednets.cost import Cost
from structurednets.plugin import BudgetTooSmallError, check_positive_int, weight_budget

__all__ = [
    "FactorSizes",
    "SizeOptions",
    "block_shapes",
    "check_block_size",
    "check_max_cost_ratio",
    "check_nnz_split",
    "check_nonzeros",
    "check_size_options",
    "cost_bounded_budget",
    "factor_costs",
    "factor_shapes",
    "layer_sizes",
    "resolve_shapes",
    "smallest_nonzeros",
    "split_nonzeros",
]

Shapes = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class FactorSizes:
    """The factors of ``W = S_1 S_2 ... S_J`` (``W`` is output_dim x input_dim).

    Attributes:
        shapes: ``(rows, cols)`` of ``S_1, ..., S_J``; ``S_1`` has output_dim rows and
            ``S_J`` has input_dim columns.
        nonzeros: stored values of each factor (a multiple of ``block_size**2``).
        block_size: side of the dense blocks the supports are made of (1: single entries).
    """

    shapes: Shapes
    nonzeros: tuple[int, ...]
    block_size: int = 1

    @property
    def nb_matrices(self) -> int:
        return len(self.shapes)

    @property
    def total_nonzeros(self) -> int:
        return sum(self.nonzeros)

    def as_layout_sizes(self) -> dict[str, object]:
        """The sizes as JSON values: the keyword options that rebuild exactly these factors."""
        return {
            "factor_shapes": [[rows, cols] for rows, cols in self.shapes],
            "nonzeros": list(self.nonzeros),
            "block_size": self.block_size,
        }


def factor_shapes(
    input_dim: int, output_dim: int, nb_matrices: int, inner_dim: int | None = None
) -> Shapes:
    """``(rows, cols)`` of each factor; every inner dimension is ``inner_dim``
    (default ``min(input_dim, output_dim)``, which keeps the rank unrestricted)."""
    nb_matrices = check_positive_int("nb_matrices", nb_matrices)
    inner = min(input_dim, output_dim) if inner_dim is None else inner_dim
    inner = check_positive_int("inner_dim", inner)
    dims = [output_dim, *([inner] * (nb_matrices - 1)), input_dim]
    return tuple((dims[j], dims[j + 1]) for j in range(nb_matrices))


def resolve_shapes(
    input_dim: int,
    output_dim: int,
    *,
    nb_matrices: int | None = None,
    inner_dim: int | None = None,
    factor_shapes: object = None,
) -> Shapes:
    """The factors' shapes from the layer's options: ``factor_shapes`` as given (checked to
    chain from ``output_dim`` rows to ``input_dim`` columns), else ``nb_matrices`` factors
    (default 2) with inner dimensions ``inner_dim``."""
    if factor_shapes is None:
        count = 2 if nb_matrices is None else nb_matrices
        return _equal_inner_shapes(input_dim, output_dim, count, inner_dim)
    if inner_dim is not None:
        raise ValueError(
            f"pass either factor_shapes or inner_dim, not both (factor_shapes fixes the inner "
            f"dimensions); got inner_dim={inner_dim!r}"
        )
    shapes = _check_shape_list(factor_shapes)
    if nb_matrices is not None and check_positive_int("nb_matrices", nb_matrices) != len(shapes):
        raise ValueError(
            f"nb_matrices={nb_matrices} does not match the {len(shapes)} factor_shapes "
            f"{[list(s) for s in shapes]}; drop nb_matrices"
        )
    expected_rows = output_dim
    for j, (rows, cols) in enumerate(shapes):
        if rows != expected_rows:
            raise ValueError(
                f"factor_shapes[{j}] must have {expected_rows} rows to chain (W = S_1 ... S_J "
                f"is output_dim x input_dim), got {[rows, cols]}"
            )
        expected_rows = cols
    if expected_rows != input_dim:
        raise ValueError(
            f"factor_shapes[-1] must have input_dim={input_dim} columns, got {list(shapes[-1])}"
        )
    return shapes


def _equal_inner_shapes(
    input_dim: int, output_dim: int, nb_matrices: int, inner_dim: int | None
) -> Shapes:
    # resolve_shapes' option of the same name hides factor_shapes there
    return factor_shapes(input_dim, output_dim, nb_matrices, inner_dim)


def _check_shape_list(value: object) -> Shapes:
    description = "factor_shapes must be a non-empty list of [rows, cols] pairs"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{description}, got {value!r}")
    shapes = []
    for j, shape in enumerate(value):
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 2:
            raise TypeError(f"{description}; factor_shapes[{j}] is {shape!r}")
        shapes.append(
            (
                check_positive_int(f"factor_shapes[{j}][0]", shape[0]),
                check_positive_int(f"factor_shapes[{j}][1]", shape[1]),
            )
        )
    return tuple(shapes)


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


def block_shapes(shapes: Sequence[tuple[int, int]], block_size: int) -> Shapes:
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


def check_nonzeros(
    nonzeros: object, shapes: Sequence[tuple[int, int]], block_size: int = 1
) -> tuple[int, ...]:
    """``nonzeros`` (stored values of each factor) as a tuple of ints, one per factor, each
    between 0 and the factor's size and a multiple of ``block_size**2``."""
    if isinstance(nonzeros, (str, bytes)) or not isinstance(nonzeros, Sequence):
        raise TypeError(
            f"nonzeros must be a list of {len(shapes)} integers (the stored values of each "
            f"factor), got {type(nonzeros).__name__}"
        )
    counts = tuple(nonzeros)
    if len(counts) != len(shapes):
        raise ValueError(
            f"nonzeros must have one count per factor ({len(shapes)} factors of shapes "
            f"{[list(s) for s in shapes]}), got {len(counts)}: {list(counts)}"
        )
    area = block_size * block_size
    for j, (count, (rows, cols)) in enumerate(zip(counts, shapes, strict=True)):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            raise TypeError(f"nonzeros[{j}] must be an integer, got {count!r}")
        if not 0 <= count <= rows * cols:
            raise ValueError(
                f"nonzeros[{j}] must be between 0 and {rows * cols} (the size of the "
                f"{rows}x{cols} factor), got {count}"
            )
        if count % area:
            raise ValueError(
                f"nonzeros[{j}] must be a multiple of block_size**2={area} (whole "
                f"{block_size}x{block_size} blocks), got {count}"
            )
    return tuple(int(count) for count in counts)


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


def require_covering_budget(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    shapes: Shapes,
    block_size: int,
) -> None:
    """Raise :class:`BudgetTooSmallError` when the budget cannot give every factor one
    nonzero (block) in each of its rows and columns (of blocks)."""
    area = block_size * block_size
    needed = sum(smallest_nonzeros(block_shapes(shapes, block_size))) * area
    if needed > weight_budget(input_dim, output_dim, nb_params_share):
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


def require_nonzeros_within_budget(
    input_dim: int, output_dim: int, nb_params_share: float, nonzeros: Sequence[int], what: str
) -> None:
    """Raise :class:`BudgetTooSmallError` when ``nonzeros`` hold more than the budget."""
    needed = sum(nonzeros)
    if needed > weight_budget(input_dim, output_dim, nb_params_share):
        raise BudgetTooSmallError("psm", input_dim, output_dim, nb_params_share, needed, what)


@dataclass(frozen=True)
class SizeOptions:
    """The layer's size options, checked against each other and against the budget.

    Attributes:
        shapes: ``(rows, cols)`` of each factor.
        block_size: side of the support blocks.
        nnz_split: relative weights of the factors' nonzeros, or ``None``.
        nonzeros: each factor's nonzeros, or ``None`` (then the budget is shared).
    """

    shapes: Shapes
    block_size: int
    nnz_split: tuple[float, ...] | None
    nonzeros: tuple[int, ...] | None


def check_size_options(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    nb_matrices: int | None = None,
    inner_dim: int | None = None,
    factor_shapes: object = None,
    nonzeros: object = None,
    nnz_split: Sequence[float] | None = None,
    block_size: int = 1,
) -> SizeOptions:
    """Check the size options of a layer (random or fitted).

    Raises :class:`BudgetTooSmallError` when the given ``nonzeros`` exceed the budget, or,
    without them, when the budget cannot give every factor one nonzero (block) in each of
    its rows and columns (of blocks); ``ValueError``/``TypeError`` for options that are
    malformed or contradict each other.
    """
    shapes = resolve_shapes(
        input_dim,
        output_dim,
        nb_matrices=nb_matrices,
        inner_dim=inner_dim,
        factor_shapes=factor_shapes,
    )
    weights = check_nnz_split(nnz_split, len(shapes))
    block_size = check_block_size(block_size, shapes)
    if nonzeros is None:
        require_covering_budget(input_dim, output_dim, nb_params_share, shapes, block_size)
        return SizeOptions(shapes, block_size, weights, None)
    if weights is not None:
        raise ValueError(
            "pass either nonzeros (the count of each factor) or nnz_split (relative "
            "shares of the budget), not both"
        )
    counts = check_nonzeros(nonzeros, shapes, block_size)
    require_nonzeros_within_budget(
        input_dim, output_dim, nb_params_share, counts, "the given nonzeros"
    )
    return SizeOptions(shapes, block_size, None, counts)


def layer_sizes(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    **options: object,
) -> FactorSizes:
    """The factors of a PSM layer built with these size options (those of
    :func:`check_size_options`) and no matrix to fit.

    ``nonzeros`` fixes each factor's count (at most the budget in all); otherwise the whole
    budget ``floor(share * input_dim * output_dim)`` is shared by ``nnz_split`` (default
    equal) in whole ``block_size x block_size`` blocks.
    """
    checked = check_size_options(input_dim, output_dim, nb_params_share, **options)
    if checked.nonzeros is not None:
        return FactorSizes(checked.shapes, checked.nonzeros, checked.block_size)
    area = checked.block_size * checked.block_size
    budget = weight_budget(input_dim, output_dim, nb_params_share)
    grid = block_shapes(checked.shapes, checked.block_size)
    blocks = split_nonzeros(budget // area, grid, checked.nnz_split)
    return FactorSizes(checked.shapes, tuple(count * area for count in blocks), checked.block_size)


def factor_costs(sizes: FactorSizes, batch_size: int) -> Cost:
    """Multiply-adds of a layer of these sizes for a batch of ``batch_size`` inputs.

    Each factor's product touches every stored value once per input: ``batch * nnz_j``
    forward (``S_j Z``, element or block supports alike). The backward does two such
    products per factor: the input gradient ``S_j^T G`` and the values' gradient, ``G Z^T``
    sampled on the support. Bias additions are not counted (as for the dense layer).
    """
    per_input = sizes.total_nonzeros
    return Cost(batch_size * per_input, 2 * batch_size * per_input)


def check_max_cost_ratio(max_cost_ratio: object) -> float | None:
    """``max_cost_ratio`` as a positive finite float, or ``None`` (no bound)."""
    if max_cost_ratio is None:
        return None
    if isinstance(max_cost_ratio, bool) or not isinstance(max_cost_ratio, numbers.Real):
        raise TypeError(
            f"max_cost_ratio must be a positive number (forward+backward multiply-adds against "
            f"nn.Linear's), got {max_cost_ratio!r}"
        )
    if not (math.isfinite(max_cost_ratio) and max_cost_ratio > 0):
        raise ValueError(f"max_cost_ratio must be positive and finite, got {max_cost_ratio!r}")
    return float(max_cost_ratio)


def cost_bounded_budget(
    budget: int,
    shapes: Sequence[tuple[int, int]],
    block_size: int,
    max_cost_ratio: float | None,
) -> int:
    """The most nonzeros (whole blocks) within ``budget`` whose layout costs at most
    ``max_cost_ratio`` times the dense layer (forward+backward, see :func:`factor_costs`:
    the ratio is ``nonzeros / (rows * cols)`` at any batch).

    Raises ``ValueError`` naming the smallest achievable ratio (every factor with one
    nonzero block in each row and column of blocks) when the bound is below it.
    """
    if max_cost_ratio is None:
        return budget
    rows, cols = shapes[0][0], shapes[-1][1]
    area = block_size * block_size
    smallest = sum(smallest_nonzeros(block_shapes(shapes, block_size))) * area
    if smallest / (rows * cols) > max_cost_ratio:
        raise ValueError(
            f"max_cost_ratio={max_cost_ratio!r} is below the smallest cost ratio of these "
            f"factors, {smallest / (rows * cols):.6g} ({smallest} nonzeros: one per row and "
            f"column of each factor); raise max_cost_ratio or use fewer factors"
        )
    bound = math.floor(max_cost_ratio * rows * cols) // area * area
    while bound / (rows * cols) > max_cost_ratio:  # float rounding of the product
        bound -= area
    return min(budget, bound)
