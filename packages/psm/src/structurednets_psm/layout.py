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

import torch

from structurednets.plugin import BudgetTooSmallError, check_positive_int, weight_budget
from structurednets_psm.factors import as_coordinates

__all__ = [
    "FactorSizes",
    "block_shapes",
    "check_block_size",
    "check_nnz_split",
    "check_nonzeros",
    "factor_shapes",
    "layer_sizes",
    "psm_nb_weight_parameters",
    "resolve_shapes",
    "sizes_of_factors",
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


def layer_sizes(
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
) -> FactorSizes:
    """The factors of a PSM layer built with these options and no matrix to fit.

    ``nonzeros`` fixes each factor's count (at most the budget in all); otherwise the whole
    budget ``floor(share * input_dim * output_dim)`` is shared by ``nnz_split`` (default
    equal) in whole ``block_size x block_size`` blocks, and :class:`BudgetTooSmallError` is
    raised when it cannot give every factor one nonzero (block) in each of its rows and
    columns (of blocks).
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
    if nonzeros is not None:
        if weights is not None:
            raise ValueError(
                "pass either nonzeros (the count of each factor) or nnz_split (relative "
                "shares of the budget), not both"
            )
        counts = check_nonzeros(nonzeros, shapes, block_size)
        require_nonzeros_within_budget(
            input_dim, output_dim, nb_params_share, counts, "the given nonzeros"
        )
        return FactorSizes(shapes, counts, block_size)
    require_covering_budget(input_dim, output_dim, nb_params_share, shapes, block_size)
    area = block_size * block_size
    budget = weight_budget(input_dim, output_dim, nb_params_share)
    blocks = split_nonzeros(budget // area, block_shapes(shapes, block_size), weights)
    return FactorSizes(shapes, tuple(count * area for count in blocks), block_size)


def sizes_of_factors(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    factors: object,
    inner_dim: int | None,
) -> tuple[FactorSizes, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The sizes of user-given factors ``S_1, ..., S_J`` and their ``(rows, cols, values)``
    coordinates (checked to chain and to fit the budget)."""
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or not factors:
        raise TypeError(
            "factors must be a non-empty list of sparse factors S_1, ..., S_J (W = S_1 ... S_J; "
            f"scipy sparse matrices, torch sparse tensors or (indices, values) pairs), got {factors!r}"
        )
    expected = factor_shapes(input_dim, output_dim, len(factors), inner_dim)
    shapes, coordinates = [], []
    previous_cols = output_dim
    for j, factor in enumerate(factors):
        is_pair = isinstance(factor, (tuple, list))
        shape, rows, cols, values = as_coordinates(
            f"factors[{j}]", factor, expected[j] if is_pair else None
        )
        if shape[0] != previous_cols:
            raise ValueError(
                f"factors[{j}] must have {previous_cols} rows to chain "
                f"(W = S_1 ... S_J is output_dim x input_dim), got shape {shape}"
            )
        previous_cols = shape[1]
        shapes.append(shape)
        coordinates.append((rows, cols, values))
    if previous_cols != input_dim:
        raise ValueError(
            f"factors[-1] must have input_dim={input_dim} columns, got shape {shapes[-1]}"
        )
    nonzeros = tuple(rows.numel() for rows, _, _ in coordinates)
    require_nonzeros_within_budget(
        input_dim, output_dim, nb_params_share, nonzeros, "the given factors"
    )
    return FactorSizes(tuple(shapes), nonzeros), coordinates


def psm_nb_weight_parameters(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    nb_matrices: int | None = None,
    nnz_split: Sequence[float] | None = None,
    inner_dim: int | None = None,
    factor_shapes: object = None,
    nonzeros: object = None,
    factors: Sequence[object] | None = None,
    seed: int = 0,
    palm_settings: object = None,
    block_size: int = 1,
) -> int:
    """Stored values of a :class:`~structurednets_psm.PSMLayer` built with these arguments
    and no ``initial_weight_matrix``: the given ``nonzeros``, the nonzeros of the given
    ``factors``, or the whole budget shared between the factors (in whole blocks)."""
    if factors is not None:
        check_factors_alone(
            factors,
            nb_matrices=nb_matrices,
            nnz_split=nnz_split,
            factor_shapes=factor_shapes,
            nonzeros=nonzeros,
            block_size=block_size,
        )
        return sizes_of_factors(input_dim, output_dim, nb_params_share, factors, inner_dim)[
            0
        ].total_nonzeros
    return layer_sizes(
        input_dim,
        output_dim,
        nb_params_share,
        nb_matrices=nb_matrices,
        inner_dim=inner_dim,
        factor_shapes=factor_shapes,
        nonzeros=nonzeros,
        nnz_split=nnz_split,
        block_size=block_size,
    ).total_nonzeros


def check_factors_alone(factors: object, **options: object) -> None:
    """Refuse the size options that given ``factors`` already decide (``block_size`` must be 1:
    given factors are element-sparse; ``nb_matrices``, if given, their number)."""
    nb_matrices = options.pop("nb_matrices", None)
    count = len(factors) if isinstance(factors, Sequence) else None
    if nb_matrices is not None and nb_matrices != count:
        raise ValueError(
            f"nb_matrices={nb_matrices!r} does not match the {count} given factors; "
            "drop nb_matrices"
        )
    if options.get("block_size", 1) != 1:
        raise ValueError(
            f"block_size={options['block_size']!r} cannot be combined with factors (given "
            "factors are element-sparse); leave block_size=1"
        )
    for name, value in options.items():
        if name != "block_size" and value is not None:
            raise ValueError(
                f"{name}={value!r} cannot be combined with factors (the given factors fix "
                f"the number of factors, their shapes and their nonzeros); drop {name}"
            )
