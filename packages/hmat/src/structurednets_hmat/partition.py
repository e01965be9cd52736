"""The block partition of an H-matrix: a block cluster tree over row and column index ranges.

Row ``i`` of an ``(output_dim x input_dim)`` matrix sits at the coordinate ``(i + 0.5) / output_dim``
and column ``j`` at ``(j + 0.5) / input_dim``, so both index sets fill ``[0, 1]`` and the
partition follows the diagonal of the rectangle (for a square matrix these are the index
positions, scaled). A cluster is a contiguous index range; it is halved while both halves keep
at least ``min_block_size`` indices. A block (row cluster x column cluster) is *admissible*, and
becomes a leaf, when ``max(diam(rows), diam(cols)) <= 2 * eta * dist(rows, cols)``; otherwise it
is split, until neither side can be split any more.

Every leaf is stored either in low-rank form ``L @ R`` (``rank * (rows + cols)`` scalars; rank 0
is an all-zero block) or densely (``rows * cols`` scalars); the rank allocation lives in the
same immutable :class:`HMatrixPartition`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from structurednets.plugin import check_dim, check_positive_int

__all__ = [
    "DEFAULT_ETA",
    "DEFAULT_MIN_BLOCK_SIZE",
    "HMatrixPartition",
    "Leaf",
    "TreeNode",
    "block_cluster_tree",
    "check_eta",
]

DEFAULT_ETA = 0.5
DEFAULT_MIN_BLOCK_SIZE = 16


def check_eta(eta: object) -> float:
    """Check the admissibility parameter: a finite real number > 0."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta must be a positive number, got {eta!r} ({type(eta).__name__})")
    value = float(eta)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"eta must be a positive finite number, got {eta!r}")
    return value


@dataclass(frozen=True)
class Leaf:
    """One block of the partition: rows ``row_start:row_stop``, columns ``col_start:col_stop``.

    Attributes:
        level: depth in the block cluster tree (the root block is level 0).
        admissible: whether the block met the admissibility condition (far from the diagonal);
            inadmissible leaves are the near-diagonal blocks of the smallest size.
        rank: rank of the low-rank form ``L @ R``; ``min(rows, cols)`` for a dense leaf.
        dense: whether the block is stored as a full ``rows x cols`` matrix.
    """

    row_start: int
    row_stop: int
    col_start: int
    col_stop: int
    level: int
    admissible: bool
    rank: int = 0
    dense: bool = False

    @property
    def nb_rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def nb_cols(self) -> int:
        return self.col_stop - self.col_start

    @property
    def shape(self) -> tuple[int, int]:
        return (self.nb_rows, self.nb_cols)

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)

    @property
    def cols(self) -> slice:
        return slice(self.col_start, self.col_stop)

    @property
    def dense_rank(self) -> int:
        """The smallest rank whose low-rank form costs at least the dense form."""
        return dense_rank(self.nb_rows, self.nb_cols)

    @property
    def nb_parameters(self) -> int:
        """Scalars this leaf stores: ``rows * cols`` if dense, else ``rank * (rows + cols)``."""
        if self.dense:
            return self.nb_rows * self.nb_cols
        return self.rank * (self.nb_rows + self.nb_cols)

    @property
    def form(self) -> str:
        return "dense" if self.dense else f"rank {self.rank}"


def dense_rank(nb_rows: int, nb_cols: int) -> int:
    """``ceil(rows * cols / (rows + cols))``: from this rank on, the dense form is no dearer."""
    return -(-(nb_rows * nb_cols) // (nb_rows + nb_cols))


@dataclass(frozen=True)
class HMatrixPartition:
    """An immutable H-matrix partition of an ``(output_dim x input_dim)`` matrix with its ranks.

    Build one with :meth:`build`; get one with other ranks with :meth:`with_ranks`.

    Attributes:
        output_dim, input_dim: the matrix's number of rows and columns.
        eta: the admissibility parameter it was built with.
        min_block_size: clusters are halved only while both halves keep this many indices.
        leaves: the blocks, ordered by (row_start, col_start); they tile the matrix.
    """

    output_dim: int
    input_dim: int
    eta: float
    min_block_size: int
    leaves: tuple[Leaf, ...] = field(repr=False)

    @classmethod
    def build(
        cls,
        output_dim: int,
        input_dim: int,
        eta: float = DEFAULT_ETA,
        min_block_size: int = DEFAULT_MIN_BLOCK_SIZE,
    ) -> HMatrixPartition:
        """The partition for these dimensions, every leaf at rank 0.

        >>> partition = HMatrixPartition.build(256, 256, eta=0.5, min_block_size=32)
        >>> len(partition.leaves), partition.leaves[0].shape
        (46, (32, 32))
        """
        tree = block_cluster_tree(output_dim, input_dim, eta, min_block_size)
        leaves = sorted(
            (node.block for node in tree if not node.children),
            key=lambda leaf: (leaf.row_start, leaf.col_start),
        )
        return cls(output_dim, input_dim, tree[0].eta, tree[0].min_block_size, tuple(leaves))

    def __post_init__(self) -> None:
        covered = sum(leaf.nb_rows * leaf.nb_cols for leaf in self.leaves)
        if covered != self.output_dim * self.input_dim:
            raise ValueError(
                f"the leaves cover {covered} entries, not the {self.output_dim} x "
                f"{self.input_dim} matrix's {self.output_dim * self.input_dim}"
            )
        for leaf in self.leaves:
            if not (
                0 <= leaf.row_start < leaf.row_stop <= self.output_dim
                and 0 <= leaf.col_start < leaf.col_stop <= self.input_dim
            ):
                raise ValueError(f"leaf {leaf} lies outside the {self.shape} matrix")
            if isinstance(leaf.rank, bool) or not isinstance(leaf.rank, numbers.Integral):
                raise TypeError(f"leaf ranks must be integers, got {leaf.rank!r}")
            if not 0 <= leaf.rank <= min(leaf.shape):
                raise ValueError(f"leaf rank must be in [0, {min(leaf.shape)}], got {leaf}")

    # -- ranks ------------------------------------------------------------------------------

    def with_ranks(
        self, ranks: Sequence[int], dense: Sequence[bool] | None = None
    ) -> HMatrixPartition:
        """The same blocks with new ranks (one per leaf) and dense flags (default: none dense).

        A dense leaf's rank is recorded as ``min(rows, cols)``, whatever ``ranks`` says.
        """
        ranks = list(ranks)
        dense = [False] * len(ranks) if dense is None else list(dense)
        if len(ranks) != len(self.leaves) or len(dense) != len(self.leaves):
            raise ValueError(
                f"need one rank and one dense flag per leaf ({len(self.leaves)}), "
                f"got {len(ranks)} ranks and {len(dense)} flags"
            )
        leaves = tuple(
            replace(
                leaf, rank=min(leaf.shape) if is_dense else _integer(rank), dense=bool(is_dense)
            )
            for leaf, rank, is_dense in zip(self.leaves, ranks, dense, strict=True)
        )
        return replace(self, leaves=leaves)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.output_dim, self.input_dim)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Rank of each leaf (a dense leaf counts as ``min(rows, cols)``)."""
        return tuple(leaf.rank for leaf in self.leaves)

    @property
    def dense_flags(self) -> tuple[bool, ...]:
        return tuple(leaf.dense for leaf in self.leaves)

    @property
    def nb_parameters(self) -> int:
        """Scalars the H-matrix stores (sum over the leaves)."""
        return sum(leaf.nb_parameters for leaf in self.leaves)

    @property
    def share(self) -> float:
        """``nb_parameters`` relative to the dense matrix's ``output_dim * input_dim``."""
        return self.nb_parameters / (self.output_dim * self.input_dim)

    @property
    def depth(self) -> int:
        return max(leaf.level for leaf in self.leaves)

    def structure_matches(self, other: HMatrixPartition) -> bool:
        """Whether ``other`` has the same dimensions and blocks (ranks may differ)."""
        return self.shape == other.shape and _blocks(self) == _blocks(other)

    # -- text and picture -------------------------------------------------------------------

    def summary(self) -> str:
        """A table of the leaves grouped by level and block shape, with ranks and parameters."""
        lines = [
            f"H-matrix partition of a {self.output_dim} x {self.input_dim} matrix "
            f"(eta={self.eta:g}, min_block_size={self.min_block_size}): {len(self.leaves)} "
            f"leaves, {self.nb_parameters} parameters (share {self.share:.4g})",
            f"{'level':>5} {'block':>11} {'leaves':>6} {'low-rank':>8} {'dense':>5} "
            f"{'zero':>5} {'ranks min/mean/max':>19} {'parameters':>10}",
        ]
        groups: dict[tuple[int, int, int], list[Leaf]] = {}
        for leaf in self.leaves:
            groups.setdefault((leaf.level, *leaf.shape), []).append(leaf)
        for (level, rows, cols), leaves in sorted(groups.items()):
            low_rank = [leaf.rank for leaf in leaves if not leaf.dense]
            nb_dense = len(leaves) - len(low_rank)
            if low_rank:
                mean = sum(low_rank) / len(low_rank)
                ranks = f"{min(low_rank)}/{mean:.1f}/{max(low_rank)}"
            else:
                ranks = "-"
            zero = sum(1 for rank in low_rank if rank == 0)
            params = sum(leaf.nb_parameters for leaf in leaves)
            lines.append(
                f"{level:>5} {f'{rows} x {cols}':>11} {len(leaves):>6} {len(low_rank):>8} "
                f"{nb_dense:>5} {zero:>5} {ranks:>19} {params:>10}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def plot(self, ax: Any = None, *, annotate: bool = True, cmap: str = "viridis") -> Any:
        """Draw the blocks (row 0 at the top) with each leaf's rank written inside it.

        Low-rank leaves are coloured by their share of a dense block's parameters
        (``rank * (rows + cols) / (rows * cols)``), dense leaves are grey and marked "D".
        Needs matplotlib (``pip install structurednets-hmat[plot]``). Returns the axes.
        """
        try:
            import matplotlib.pyplot as plt
            from matplotlib.patches import Rectangle
        except ImportError as error:
            raise ImportError(
                "HMatrixPartition.plot needs matplotlib: pip install 'structurednets-hmat[plot]'"
            ) from error
        if ax is None:
            height = 6.0
            width = max(2.0, min(12.0, height * self.input_dim / self.output_dim))
            _, ax = plt.subplots(figsize=(width, height))
        colours = plt.get_cmap(cmap)
        # Font size in points from the block's size on screen.
        ax.figure.canvas.draw_idle()
        points_per_row = 72.0 * ax.get_window_extent().height / ax.figure.dpi / self.output_dim
        points_per_col = 72.0 * ax.get_window_extent().width / ax.figure.dpi / self.input_dim
        for leaf in self.leaves:
            if leaf.dense:
                face = "0.75"
                label = "D"
            else:
                fill = leaf.nb_parameters / (leaf.nb_rows * leaf.nb_cols)
                face = colours(0.15 + 0.85 * min(1.0, fill)) if leaf.rank else "white"
                label = str(leaf.rank)
            ax.add_patch(
                Rectangle(
                    (leaf.col_start, leaf.row_start),
                    leaf.nb_cols,
                    leaf.nb_rows,
                    facecolor=face,
                    edgecolor="black",
                    linewidth=0.4,
                )
            )
            if annotate:
                box = min(leaf.nb_rows * points_per_row, leaf.nb_cols * points_per_col)
                size = min(12.0, 0.45 * box / max(1, len(label)) * 1.6)
                if size >= 3.0:
                    ax.text(
                        leaf.col_start + leaf.nb_cols / 2,
                        leaf.row_start + leaf.nb_rows / 2,
                        label,
                        ha="center",
                        va="center",
                        fontsize=size,
                        color="white" if (not leaf.dense and leaf.rank) else "black",
                    )
        ax.set_xlim(0, self.input_dim)
        ax.set_ylim(self.output_dim, 0)
        ax.set_aspect("auto")
        ax.set_xlabel(f"column (input, {self.input_dim})")
        ax.set_ylabel(f"row (output, {self.output_dim})")
        ax.set_title(
            f"{self.output_dim} x {self.input_dim}, eta={self.eta:g}: {len(self.leaves)} leaves, "
            f"{self.nb_parameters} parameters (share {self.share:.3g})",
            fontsize=9,
        )
        return ax


@dataclass(frozen=True)
class TreeNode:
    """A node of the block cluster tree: its block, and its children's positions in the tree
    list (none for a leaf of the standard partition)."""

    block: Leaf
    children: tuple[int, ...]
    eta: float
    min_block_size: int


def block_cluster_tree(
    output_dim: int,
    input_dim: int,
    eta: float = DEFAULT_ETA,
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE,
) -> list[TreeNode]:
    """Every node of the block cluster tree, parents before children; ``[0]`` is the root.

    The leaves are the blocks of :meth:`HMatrixPartition.build`; the inner nodes are the
    inadmissible blocks that were split (admissible=False).
    """
    output_dim = check_dim("output_dim", output_dim)
    input_dim = check_dim("input_dim", input_dim)
    eta = check_eta(eta)
    min_block_size = check_positive_int("min_block_size", min_block_size)
    blocks: list[Leaf] = [Leaf(0, output_dim, 0, input_dim, 0, admissible=False)]
    children: list[list[int]] = [[]]
    position = 0
    while position < len(blocks):  # breadth first
        block = blocks[position]
        r0, r1, c0, c1 = block.row_start, block.row_stop, block.col_start, block.col_stop
        if _admissible(_box(r0, r1, output_dim), _box(c0, c1, input_dim), eta):
            blocks[position] = replace(block, admissible=True)
        else:
            row_parts = _halves(r0, r1, min_block_size)
            col_parts = _halves(c0, c1, min_block_size)
            if len(row_parts) > 1 or len(col_parts) > 1:
                for s0, s1 in row_parts:
                    for t0, t1 in col_parts:
                        children[position].append(len(blocks))
                        blocks.append(Leaf(s0, s1, t0, t1, block.level + 1, admissible=False))
                        children.append([])
        position += 1
    return [
        TreeNode(block, tuple(kids), eta, min_block_size)
        for block, kids in zip(blocks, children, strict=True)
    ]


def _integer(value: object) -> object:
    """``value`` as a plain ``int`` if it is an integer (numpy ones too); else unchanged, for
    the check in ``HMatrixPartition.__post_init__`` to reject."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _blocks(partition: HMatrixPartition) -> list[tuple[int, int, int, int]]:
    return [(lf.row_start, lf.row_stop, lf.col_start, lf.col_stop) for lf in partition.leaves]


def _box(start: int, stop: int, size: int) -> tuple[float, float]:
    """Coordinates of the first and last index of ``start:stop`` in [0, 1]."""
    return ((start + 0.5) / size, (stop - 0.5) / size)


def _admissible(rows: tuple[float, float], cols: tuple[float, float], eta: float) -> bool:
    distance = max(rows[0], cols[0]) - min(rows[1], cols[1])
    if distance <= 0.0:
        return False
    diameter = max(rows[1] - rows[0], cols[1] - cols[0])
    return diameter <= 2.0 * eta * distance


def _halves(start: int, stop: int, min_block_size: int) -> list[tuple[int, int]]:
    size = stop - start
    if size < 2 * min_block_size:
        return [(start, stop)]
    middle = start + size // 2
    return [(start, middle), (middle, stop)]


def leaf_groups(leaves: Iterable[Leaf]) -> dict[tuple[int, int], list[int]]:
    """Indices of the leaves grouped by block shape ``(rows, cols)``, in a fixed order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, leaf in enumerate(leaves):
        groups.setdefault(leaf.shape, []).append(index)
    return dict(sorted(groups.items()))
