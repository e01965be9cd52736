"""The sizes of a Monarch layer: block counts, block sizes and the rank per block pair.

A Monarch weight ``W`` (output_dim x input_dim) splits its columns into ``k`` input blocks and
its rows into ``q`` output groups; every block pair ``W[rows of s, cols of j]`` has rank at most
``r``. It is stored as two block-diagonal factors ``W = L P R``: ``R`` holds ``k`` blocks of shape
``(q r) x p_j``, ``P`` is the fixed permutation that sends the ``r`` intermediates of pair
``(s, j)`` from input block ``j`` to output group ``s``, and ``L`` holds ``q`` blocks of shape
``l_s x (k r)``. That is ``r * (q * input_dim + k * output_dim)`` weight scalars.

Sizes that do not divide evenly are split into blocks of two sizes differing by one (the
larger ones first), so that no parameter is padding.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

from structurednets.plugin import BudgetTooSmallError, check_positive_int, weight_budget

__all__ = [
    "MonarchShape",
    "check_nb_blocks",
    "default_candidates",
    "monarch_nb_weight_parameters",
    "plan_monarch",
    "rank_candidates",
]

#: The default layout keeps to block counts whose layouts use at least this share of the
#: best budget use any block count reaches, then picks the one nearest the classic
#: Monarch choice of about sqrt(dim) blocks per side.
BUDGET_USE_TOLERANCE = 0.9


@dataclass(frozen=True)
class MonarchShape:
    """The shape of a Monarch weight: ``nb_input_blocks`` (k), ``nb_output_blocks`` (q), ``rank`` (r).

    Input blocks have ``input_block_size`` (p) columns, the first ``nb_long_input_blocks`` of
    them, and ``p - 1`` columns the others; the same for output groups and rows.
    """

    input_dim: int
    output_dim: int
    nb_input_blocks: int
    nb_output_blocks: int
    rank: int

    @property
    def input_block_size(self) -> int:
        return -(-self.input_dim // self.nb_input_blocks)

    @property
    def output_block_size(self) -> int:
        return -(-self.output_dim // self.nb_output_blocks)

    @property
    def nb_long_input_blocks(self) -> int:
        """Input blocks of ``input_block_size`` columns; the rest have one column fewer."""
        return self.input_dim - self.nb_input_blocks * (self.input_block_size - 1)

    @property
    def nb_long_output_blocks(self) -> int:
        """Output groups of ``output_block_size`` rows; the rest have one row fewer."""
        return self.output_dim - self.nb_output_blocks * (self.output_block_size - 1)

    @property
    def nb_short_input_blocks(self) -> int:
        return self.nb_input_blocks - self.nb_long_input_blocks

    @property
    def nb_short_output_blocks(self) -> int:
        return self.nb_output_blocks - self.nb_long_output_blocks

    @property
    def max_rank(self) -> int:
        """The largest useful rank: the smaller side of the largest block pair."""
        return min(self.input_block_size, self.output_block_size)

    @property
    def intermediate_width(self) -> int:
        """Numbers per sample between the two products: ``k * q * r``."""
        return self.nb_input_blocks * self.nb_output_blocks * self.rank

    @property
    def nb_weight_parameters(self) -> int:
        return self.rank * (
            self.nb_output_blocks * self.input_dim + self.nb_input_blocks * self.output_dim
        )

    def input_slices(self) -> Iterator[slice]:
        """The columns of each input block, in order."""
        yield from _slices(self.input_dim, self.nb_input_blocks)

    def output_slices(self) -> Iterator[slice]:
        """The rows of each output group, in order."""
        yield from _slices(self.output_dim, self.nb_output_blocks)

    def sizes(self) -> dict[str, object]:
        """The keyword options that rebuild this shape: ``nb_blocks`` and ``rank``."""
        return {"nb_blocks": [self.nb_input_blocks, self.nb_output_blocks], "rank": self.rank}


def _slices(dim: int, nb_blocks: int) -> Iterator[slice]:
    size = -(-dim // nb_blocks)
    nb_long = dim - nb_blocks * (size - 1)
    start = 0
    for index in range(nb_blocks):
        stop = start + (size if index < nb_long else size - 1)
        yield slice(start, stop)
        start = stop


def check_nb_blocks(nb_blocks: object, input_dim: int, output_dim: int) -> tuple[int, int]:
    """``nb_blocks`` as ``(nb_input_blocks, nb_output_blocks)``: an int (both) or a pair."""
    if isinstance(nb_blocks, numbers.Integral) and not isinstance(nb_blocks, bool):
        pair = (nb_blocks, nb_blocks)
    elif isinstance(nb_blocks, (tuple, list)) and len(nb_blocks) == 2:
        pair = tuple(nb_blocks)
    else:
        raise TypeError(
            "nb_blocks must be a positive integer or a pair (nb_input_blocks, "
            f"nb_output_blocks), got {nb_blocks!r} ({type(nb_blocks).__name__})"
        )
    k = check_positive_int("nb_blocks[0] (input blocks)", pair[0])
    q = check_positive_int("nb_blocks[1] (output blocks)", pair[1])
    if k > input_dim or q > output_dim:
        raise ValueError(
            f"nb_blocks={nb_blocks!r} asks for {k} input blocks of {input_dim} columns and "
            f"{q} output blocks of {output_dim} rows; each block needs at least one, so use "
            f"at most ({input_dim}, {output_dim})"
        )
    return k, q


def _powers_of_two(limit: int) -> list[int]:
    return [2**e for e in range(int(math.log2(limit)) + 1)]


def default_candidates(input_dim: int, output_dim: int) -> list[tuple[int, int]]:
    """Block counts the default layout and the fit's search consider: powers of two per side."""
    return [(k, q) for k in _powers_of_two(input_dim) for q in _powers_of_two(output_dim)]


def _distance_to_classic(input_dim: int, output_dim: int, k: int, q: int) -> float:
    return abs(math.log(k / math.sqrt(input_dim))) + abs(math.log(q / math.sqrt(output_dim)))


def _shape_for(
    input_dim: int, output_dim: int, budget: int, k: int, q: int, rank: int | None
) -> MonarchShape | None:
    """The shape with these block counts and ``rank`` (or the largest the budget allows), or
    ``None`` when it does not fit."""
    per_rank = q * input_dim + k * output_dim
    shape = MonarchShape(input_dim, output_dim, k, q, 1)
    if rank is None:
        rank = min(budget // per_rank, shape.max_rank)
    if rank < 1 or rank > shape.max_rank or rank * per_rank > budget:
        return None
    return MonarchShape(input_dim, output_dim, k, q, rank)


def rank_candidates(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    nb_blocks: object = None,
    rank: int | None = None,
) -> list[MonarchShape]:
    """Every shape the options allow: the given block counts, or :func:`default_candidates`;
    the given rank, or the largest the budget allows for each. Raises
    :class:`BudgetTooSmallError` when none fits and ``ValueError`` for a rank no block allows."""
    budget = weight_budget(input_dim, output_dim, nb_params_share)
    if rank is not None:
        rank = check_positive_int("rank", rank)
    if nb_blocks is not None:
        pairs = [check_nb_blocks(nb_blocks, input_dim, output_dim)]
    else:
        pairs = default_candidates(input_dim, output_dim)
    if rank is not None:
        largest = max(MonarchShape(input_dim, output_dim, k, q, 1).max_rank for k, q in pairs)
        if rank > largest:
            blocks = "these blocks" if nb_blocks is not None else "any blocks"
            raise ValueError(
                f"rank must be at most {largest} (the smaller side of a block pair) for "
                f"{blocks} of a {output_dim} x {input_dim} weight, got rank={rank}"
            )
    shapes = [_shape_for(input_dim, output_dim, budget, k, q, rank) for k, q in pairs]
    shapes = [shape for shape in shapes if shape is not None]
    if not shapes:
        k, q = pairs[0] if nb_blocks is not None else (1, 1)
        needed = (rank or 1) * (q * input_dim + k * output_dim)
        what = f"{k} x {q} blocks (input x output) at rank {rank or 1}"
        raise BudgetTooSmallError("monarch", input_dim, output_dim, nb_params_share, needed, what)
    return shapes


def plan_monarch(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    nb_blocks: object = None,
    rank: int | None = None,
) -> MonarchShape:
    """The shape of a Monarch layer built without a matrix to fit.

    Given block counts, the rank is the largest the budget allows (capped at the smaller side
    of a block pair). Otherwise, among power-of-two block counts, the layouts that use at least
    ``BUDGET_USE_TOLERANCE`` of the best budget use qualify; of those, the ones whose
    intermediate (``k q r`` numbers per sample, permuted between the two products) is at most
    ``input_dim + output_dim`` wide are preferred, as their permutation costs less than
    reading the input and writing the output. The one nearest the classic Monarch choice
    (about ``sqrt(dim)`` blocks per side) wins; then the one holding more weights, then the
    one with fewer blocks.
    """
    shapes = rank_candidates(input_dim, output_dim, nb_params_share, nb_blocks, rank)
    best_use = max(shape.nb_weight_parameters for shape in shapes)
    qualified = [s for s in shapes if s.nb_weight_parameters >= BUDGET_USE_TOLERANCE * best_use]
    narrow = [s for s in qualified if s.intermediate_width <= input_dim + output_dim]
    return min(
        narrow or qualified,
        key=lambda s: (
            round(
                _distance_to_classic(input_dim, output_dim, s.nb_input_blocks, s.nb_output_blocks),
                9,
            ),
            -s.nb_weight_parameters,
            s.nb_input_blocks + s.nb_output_blocks,
        ),
    )


def monarch_nb_weight_parameters(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    nb_blocks: object = None,
    rank: int | None = None,
) -> int:
    """Weight scalars of a :class:`~structurednets_monarch.MonarchLayer` built with these
    options (no ``initial_weight_matrix``): ``rank * (q * input_dim + k * output_dim)``."""
    return plan_monarch(
        input_dim, output_dim, nb_params_share, nb_blocks, rank
    ).nb_weight_parameters
