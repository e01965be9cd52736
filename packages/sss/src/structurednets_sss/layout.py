"""The layout of an SSS layer: stages, block sizes and state dimensions, and the parameter count.

Shared by :class:`~structurednets_sss.SSSLayer` and
:func:`~structurednets_sss.options.sss_nb_weight_parameters`, so that
the count predicted without building a layer is the count the layer holds. The sizes
(:class:`SSSSizes`) are what ``layer.layout.sizes`` records: ``input_sizes``, ``output_sizes``,
``causal_dims`` and ``anticausal_dims``, which are also constructor options that rebuild
exactly that shape.

Indexing (0-based stages ``k = 0 .. K-1``): the causal state ``x_k`` enters stage ``k`` and
``x_{k+1} = A_k x_k + B_k u_k``; the anticausal state ``z_k`` enters stage ``k`` from the right
and ``z_{k-1} = E_k z_k + F_k u_k``; ``y_k = C_k x_k + D_k u_k + G_k z_k``. The states at the
two ends (``x_0``, ``x_K``, ``z_{-1}``, ``z_{K-1}``) have dimension 0. A boundary ``p``
(``p = 0 .. K-2``) sits between stage ``p`` and stage ``p + 1``; the causal state crossing it
is ``x_{p+1}`` and the anticausal one ``z_p``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from structurednets.cost import DEFAULT_COST_BATCH_SIZE, Cost, dense_cost
from structurednets.plugin import BudgetTooSmallError, weight_budget

if TYPE_CHECKING:
    from structurednets_sss.options import StageOptions

__all__ = [
    "KINDS",
    "SSSSizes",
    "block_sizes",
    "check_cost_bound",
    "check_max_cost_ratio",
    "cost_ratio",
    "default_nb_stages",
    "even_sizes",
    "sizes_cost",
    "sizes_from_options",
    "stack_layout",
]

#: The seven kinds of stage matrices, in the order the layer stores them.
KINDS = ("D", "A", "B", "C", "E", "F", "G")


def block_sizes(total: int, nb_stages: int) -> tuple[int, ...]:
    """Split ``total`` rows or columns into ``nb_stages`` blocks whose sizes differ by <= 1.

    The boundaries are ``floor(p * total / nb_stages)``, so that the split into ``2K`` blocks
    refines the split into ``K`` blocks.
    """
    cuts = [(p * total) // nb_stages for p in range(nb_stages + 1)]
    return tuple(b - a for a, b in itertools.pairwise(cuts))


@dataclass(frozen=True)
class SSSSizes:
    """The sizes of an SSS layer (what ``layer.layout.sizes`` records).

    Attributes:
        input_sizes: ``n_k``, the width of the input block ``u_k`` of each stage (sum: input_dim).
        output_sizes: ``m_k``, the height of the output block ``y_k`` (sum: output_dim).
        causal_dims: dimension of the causal state crossing each boundary, ``dim x_{p+1}``
            (``K - 1`` values).
        anticausal_dims: dimension of the anticausal state crossing each boundary,
            ``dim z_p`` (``K - 1`` values).
    """

    input_sizes: tuple[int, ...]
    output_sizes: tuple[int, ...]
    causal_dims: tuple[int, ...]
    anticausal_dims: tuple[int, ...]

    @property
    def nb_stages(self) -> int:
        return len(self.input_sizes)

    def x_dims(self) -> tuple[int, ...]:
        """``dim x_k`` for ``k = 0 .. K`` (the ends are 0)."""
        return (0, *self.causal_dims, 0)

    def z_dims(self) -> tuple[int, ...]:
        """``dim z_k`` for ``k = -1 .. K-1`` (the ends are 0); index ``k + 1``."""
        return (0, *self.anticausal_dims, 0)

    def stage_shapes(self) -> dict[str, list[tuple[int, int]]]:
        """The shape of every stage matrix, per kind (``"A"`` .. ``"G"``), ``K`` shapes each.

        Matrices acting on or producing an end state have a zero-size dimension.
        """
        n, m = self.input_sizes, self.output_sizes
        dx, dz = self.x_dims(), self.z_dims()
        K = self.nb_stages
        return {
            "D": [(m[k], n[k]) for k in range(K)],
            "A": [(dx[k + 1], dx[k]) for k in range(K)],
            "B": [(dx[k + 1], n[k]) for k in range(K)],
            "C": [(m[k], dx[k]) for k in range(K)],
            "E": [(dz[k], dz[k + 1]) for k in range(K)],
            "F": [(dz[k], n[k]) for k in range(K)],
            "G": [(m[k], dz[k + 1]) for k in range(K)],
        }

    @property
    def nb_weight_parameters(self) -> int:
        """Scalars of all stage matrices together."""
        return sum(r * c for shapes in self.stage_shapes().values() for r, c in shapes)

    def padded_dims(self) -> tuple[int, int, int, int]:
        """``(mb, nb, dx, dz)``: the block and state sizes every stage is padded to in the
        kernel's stage stacks (the largest of each)."""
        return (
            max(self.output_sizes),
            max(self.input_sizes),
            max(self.causal_dims, default=0),
            max(self.anticausal_dims, default=0),
        )

    @property
    def padded_nb_parameters(self) -> int:
        """Scalars of the padded stage stacks the kernel multiplies (zeros included):
        ``K (mb + dx + dz) nb + K mb (dx + dz) + (K - 2)(dx^2 + dz^2)``."""
        K = self.nb_stages
        mb, nb, dx, dz = self.padded_dims()
        if K == 1:
            return mb * nb
        return K * (mb + dx + dz) * nb + K * mb * (dx + dz) + (K - 2) * (dx * dx + dz * dz)

    def layout_sizes(self) -> dict[str, list[int]]:
        """The sizes as JSON values, keyed by the constructor options that rebuild them."""
        return {
            "input_sizes": list(self.input_sizes),
            "output_sizes": list(self.output_sizes),
            "causal_dims": list(self.causal_dims),
            "anticausal_dims": list(self.anticausal_dims),
        }

    def describe(self) -> str:
        """A short description for messages and ``repr``: stages and state dimensions."""
        stages = "1 stage" if self.nb_stages == 1 else f"{self.nb_stages} stages"
        return (
            f"{stages}, state dims {_describe_dims(self.causal_dims)} (causal) "
            f"and {_describe_dims(self.anticausal_dims)} (anticausal)"
        )


def sizes_cost(sizes: SSSSizes, batch_size: int) -> Cost:
    """The multiply-adds of :class:`~structurednets_sss.kernels.SSSMultiply` for a batch.

    The kernel multiplies padded, merged stage stacks, so every product counts the padded
    sizes (:meth:`SSSSizes.padded_nb_parameters`): forward is one multiply-add per stacked
    scalar and sample (``[D; B; F]`` on the input blocks, the two recursions through ``A``
    and ``E``, then ``[C, G]`` on the states); backward twice that (the input's gradient
    through the transposed products and adjoint recursions, and one product per stack for
    the parameters' gradients). The bias is not counted, as for ``nn.Linear``.
    """
    forward = batch_size * sizes.padded_nb_parameters
    return Cost(forward, 2 * forward)


def check_max_cost_ratio(value: object) -> float | None:
    """Check the ``max_cost_ratio`` option: ``None`` or a positive real number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"max_cost_ratio must be a positive number or None, got {value!r}")
    if not value > 0:
        raise ValueError(f"max_cost_ratio must be > 0, got {value!r}")
    return float(value)


def cost_ratio(sizes: SSSSizes) -> float:
    """Forward plus backward multiply-adds of a layer of ``sizes`` against ``nn.Linear``, at
    the batch size of ``layer.cost_ratio()``."""
    batch = DEFAULT_COST_BATCH_SIZE
    n, m = sum(sizes.input_sizes), sum(sizes.output_sizes)
    return sizes_cost(sizes, batch).ratio(dense_cost(n, m, batch))


def check_cost_bound(sizes: SSSSizes, max_cost_ratio: float | None, what: str) -> None:
    """Raise ``ValueError`` when ``sizes`` cost more than ``max_cost_ratio``."""
    if max_cost_ratio is not None and cost_ratio(sizes) > max_cost_ratio:
        raise ValueError(
            f"max_cost_ratio={max_cost_ratio:g} is below the cost ratio of {what} "
            f"({sizes.describe()}), {cost_ratio(sizes):.4f}"
        )


def stack_layout(sizes: SSSSizes) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """The shapes of the kernel's stacks ``S_in``, ``S_out``, ``A``, ``E`` (see
    :mod:`structurednets_sss.kernels`) and, for every entry of them in that order, its
    position in ``[0, *D, *A, *B, *C, *E, *F, *G]`` (the flat parameters after a zero; 0 for
    padding)."""
    K = sizes.nb_stages
    mb, nb, dx, dz = sizes.padded_dims()
    if K == 1:
        dx = dz = 0
    transitions = max(K - 2, 0)
    shapes = [(K, mb + dx + dz, nb), (K, mb, dx + dz), (transitions, dx, dx), (transitions, dz, dz)]
    starts = list(itertools.accumulate((math.prod(shape) for shape in shapes), initial=0))
    index = torch.zeros(starts[-1], dtype=torch.long)
    # Per kind: (stack, stage -> stack entry, row offset, column offset).
    places = {
        "D": (0, lambda k: k, 0, 0),
        "B": (0, lambda k: k, mb, 0),
        "F": (0, lambda k: k, mb + dx, 0),
        "C": (1, lambda k: k, 0, 0),
        "G": (1, lambda k: k, 0, dx),
        "A": (2, lambda k: k - 1, 0, 0),
        "E": (3, lambda k: k - 1, 0, 0),
    }
    offset = 1
    for kind, stage_shapes in sizes.stage_shapes().items():
        stack, entry, row0, col0 = places[kind]
        _, height, width = shapes[stack]
        for k, (rows, cols) in enumerate(stage_shapes):
            if rows * cols:
                grid = (torch.arange(rows)[:, None] + row0) * width + torch.arange(cols) + col0
                where = starts[stack] + entry(k) * height * width + grid.reshape(-1)
                index[where] = torch.arange(offset, offset + rows * cols)
            offset += rows * cols
    return shapes, index


def _describe_dims(dims: Sequence[int]) -> str:
    if not dims:
        return "none"
    low, high = min(dims), max(dims)
    return f"{low}" if low == high else f"{low}..{high}"


def clip_causal_dims(
    dims: Sequence[int], input_sizes: Sequence[int], output_sizes: Sequence[int]
) -> tuple[int, ...]:
    """Causal state dimensions capped where a larger state could not add anything.

    ``x_{k+1}`` is made from ``x_k`` and ``u_k``, so ``dim x_{k+1} <= dim x_k + n_k``; it feeds
    ``y_{k+1}`` and ``x_{k+2}``, so ``dim x_{k+1} <= m_{k+1} + dim x_{k+2}``. Within these caps
    the dimension is the rank of the Hankel block ``W[rows after boundary, cols before it]``
    that the state can represent; beyond them the realisation is not minimal.
    """
    clipped = list(dims)
    previous = 0
    for p in range(len(clipped)):
        clipped[p] = min(clipped[p], previous + input_sizes[p])
        previous = clipped[p]
    following = 0
    for p in reversed(range(len(clipped))):
        clipped[p] = min(clipped[p], following + output_sizes[p + 1])
        following = clipped[p]
    return tuple(clipped)


def clip_anticausal_dims(
    dims: Sequence[int], input_sizes: Sequence[int], output_sizes: Sequence[int]
) -> tuple[int, ...]:
    """Anticausal state dimensions capped as in :func:`clip_causal_dims`, mirrored."""
    return clip_causal_dims(dims[::-1], input_sizes[::-1], output_sizes[::-1])[::-1]


def capped_sizes(
    input_sizes: Sequence[int],
    output_sizes: Sequence[int],
    causal_dims: Sequence[int],
    anticausal_dims: Sequence[int],
) -> SSSSizes:
    """:class:`SSSSizes` with the state dimensions clipped to the minimal-realisation caps."""
    return SSSSizes(
        tuple(int(s) for s in input_sizes),
        tuple(int(s) for s in output_sizes),
        clip_causal_dims(causal_dims, input_sizes, output_sizes),
        clip_anticausal_dims(anticausal_dims, input_sizes, output_sizes),
    )


def even_sizes(
    input_dim: int,
    output_dim: int,
    nb_stages: int,
    causal_dims: Sequence[int] | int = 0,
    anticausal_dims: Sequence[int] | int | None = None,
) -> SSSSizes:
    """Sizes with evenly split blocks and the given (clipped) state dimensions."""
    if anticausal_dims is None:
        anticausal_dims = causal_dims
    if isinstance(causal_dims, int):
        causal_dims = [causal_dims] * (nb_stages - 1)
    if isinstance(anticausal_dims, int):
        anticausal_dims = [anticausal_dims] * (nb_stages - 1)
    return capped_sizes(
        block_sizes(input_dim, nb_stages),
        block_sizes(output_dim, nb_stages),
        causal_dims,
        anticausal_dims,
    )


def largest_uniform_state_dim(input_dim: int, output_dim: int, nb_stages: int, budget: int) -> int:
    """The largest state dimension ``d`` (same for every boundary, causal and anticausal, then
    clipped) whose sizes fit ``budget``; ``-1`` if even ``d = 0`` does not fit."""
    if even_sizes(input_dim, output_dim, nb_stages, 0).nb_weight_parameters > budget:
        return -1
    low, high = 0, min(input_dim, output_dim)  # clipping makes larger d change nothing
    while low < high:
        middle = (low + high + 1) // 2
        if even_sizes(input_dim, output_dim, nb_stages, middle).nb_weight_parameters <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def stage_candidates(input_dim: int, output_dim: int) -> list[int]:
    """Numbers of stages worth trying, ascending: powers of two and three times powers of two
    (1, 2, 3, 4, 6, 8, 12, 16, 24, ...) up to ``min(input_dim, output_dim)``, and that minimum
    itself (the most stages, whose block diagonal is the cheapest)."""
    most = min(input_dim, output_dim)
    candidates = set()
    power = 1
    while power <= most:
        candidates.add(power)
        if 3 * power <= most:
            candidates.add(3 * power)
        power *= 2
    candidates.add(most)
    return sorted(candidates)


def _powers_of_two(most: int) -> list[int]:
    candidates = []
    power = 1
    while power <= most:
        candidates.append(power)
        power *= 2
    if candidates[-1] != most:
        candidates.append(most)
    return candidates


def default_nb_stages(input_dim: int, output_dim: int, budget: int) -> int:
    """The default number of stages ``K`` for a layer without a matrix to fit.

    The fewest stages (a power of two) whose diagonal blocks ``D_k`` take at most half of the
    budget, which leaves the other half or more to the states; fewer stages mean fewer
    sequential steps in ``forward``. When no such ``K`` exists, the most stages,
    ``min(input_dim, output_dim)``, whose block diagonal is the cheapest. See the README for
    how this compares with the number of stages fitted matrices choose.
    """
    candidates = _powers_of_two(min(input_dim, output_dim))
    for nb_stages in candidates:
        if 2 * even_sizes(input_dim, output_dim, nb_stages).nb_weight_parameters <= budget:
            return nb_stages
    return candidates[-1]


def requested_sizes(
    input_dim: int, output_dim: int, nb_stages: int, options: StageOptions
) -> SSSSizes:
    """Even blocks over ``nb_stages`` with the (capped) state dimensions the options give; a
    part whose dimension is not given takes the other part's. Needs a dimension given."""
    causal, anticausal = options.causal_dims, options.anticausal_dims
    if causal is None:
        causal = anticausal
    if anticausal is None:
        anticausal = causal
    return even_sizes(input_dim, output_dim, nb_stages, causal, anticausal)


def sizes_from_options(
    input_dim: int, output_dim: int, nb_params_share: float, options: StageOptions
) -> SSSSizes:
    """The sizes of a layer built without a matrix to fit.

    The number of stages defaults to :func:`default_nb_stages`. Without state dimensions,
    both parts get the largest uniform dimension that fits the budget. Raises
    :class:`BudgetTooSmallError` when the sizes do not fit.
    """
    budget = weight_budget(input_dim, output_dim, nb_params_share)
    if options.exact is not None:
        sizes = options.exact
    else:
        nb_stages = options.nb_stages
        if nb_stages is None:
            nb_stages = default_nb_stages(input_dim, output_dim, budget)
        if options.causal_dims is None and options.anticausal_dims is None:
            smallest = even_sizes(input_dim, output_dim, nb_stages, 0)
            if smallest.nb_weight_parameters > budget:
                stages = "1 stage" if nb_stages == 1 else f"{nb_stages} stages"
                what = f"{stages} without states (block diagonal)"
                if options.nb_stages is None:
                    what = f"its smallest form, {what}"
                raise BudgetTooSmallError(
                    "sss",
                    input_dim,
                    output_dim,
                    nb_params_share,
                    smallest.nb_weight_parameters,
                    what,
                )
            dim = largest_uniform_state_dim(input_dim, output_dim, nb_stages, budget)
            return even_sizes(input_dim, output_dim, nb_stages, dim)
        sizes = requested_sizes(input_dim, output_dim, nb_stages, options)
    if sizes.nb_weight_parameters > budget:
        raise BudgetTooSmallError(
            "sss",
            input_dim,
            output_dim,
            nb_params_share,
            sizes.nb_weight_parameters,
            sizes.describe(),
        )
    return sizes
