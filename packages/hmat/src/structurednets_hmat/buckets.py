"""The leaves of an H-matrix grouped into buckets, the units of the batched product.

A *low-rank bucket* holds the leaves of one block shape and similar ranks (padded to the
largest), typically one level of the partition; the right factors of all leaves in a block
column are stacked (``Rcol``), and so are the left factors of all leaves in a block row
(``Lrow``). A *dense bucket* holds dense leaves of one shape, runs along a diagonal where they
are evenly spaced. Evenly spaced blocks are *strided*: views of the input and output, no copy.
The buckets are derived from the partition alone (the layer rebuilds them from its layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from structurednets_hmat.partition import Leaf

__all__ = ["BlockRange", "DenseBucket", "LowRankBucket", "make_buckets"]


@dataclass(frozen=True)
class BlockRange:
    """Equal-size index blocks ``start_g .. start_g + size - 1`` of a matrix's rows or columns.

    They are *strided* when evenly spaced by ``step >= size``: then the blocks of a contiguous
    ``(n, batch)`` matrix are one view of shape ``(count, size, batch)``.
    """

    starts: tuple[int, ...]
    size: int

    @property
    def count(self) -> int:
        return len(self.starts)

    @property
    def step(self) -> int:
        """The spacing of evenly spaced blocks, or 0."""
        if self.count == 1:
            return self.size
        step = self.starts[1] - self.starts[0]
        evenly = all(b - a == step for a, b in zip(self.starts, self.starts[1:], strict=False))
        return step if evenly and step >= self.size else 0

    @property
    def strided(self) -> bool:
        return self.step > 0

    def index(self) -> torch.Tensor:
        """``(count, size)`` indices of the blocks' rows."""
        return torch.tensor(self.starts)[:, None] + torch.arange(self.size)


@dataclass(frozen=True)
class DenseBucket:
    """Dense leaves of one shape; block ``g`` is ``rows.starts[g]``, ``cols.starts[g]``."""

    leaves: tuple[int, ...]
    rows: BlockRange
    cols: BlockRange

    dense = True

    @property
    def nb_leaves(self) -> int:
        return len(self.leaves)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.size, self.cols.size)


@dataclass(frozen=True)
class LowRankBucket:
    """Low-rank leaves of one shape ``(r, c)``, ranks padded to ``rank``.

    Leaf ``g`` lies in block row ``row_of[g]`` (of ``rows``), where it is the ``row_slot[g]``-th
    leaf, and in block column ``col_of[g]`` (of ``cols``) as the ``col_slot[g]``-th leaf. The
    stacked factors are ``Lrow`` of shape ``(rows.count, r, row_slots * rank)`` and ``Rcol``
    of shape ``(cols.count, col_slots * rank, c)``; padding entries are zero.
    """

    leaves: tuple[int, ...]
    ranks: tuple[int, ...]
    rank: int
    rows: BlockRange
    cols: BlockRange
    row_of: tuple[int, ...]
    row_slot: tuple[int, ...]
    col_of: tuple[int, ...]
    col_slot: tuple[int, ...]

    dense = False

    @property
    def nb_leaves(self) -> int:
        return len(self.leaves)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.size, self.cols.size)

    @property
    def row_slots(self) -> int:
        return max(self.row_slot) + 1

    @property
    def col_slots(self) -> int:
        return max(self.col_slot) + 1

    @property
    def left_shape(self) -> tuple[int, int, int]:
        return (self.rows.count, self.rows.size, self.row_slots * self.rank)

    @property
    def right_shape(self) -> tuple[int, int, int]:
        return (self.cols.count, self.col_slots * self.rank, self.cols.size)

    @property
    def padded(self) -> bool:
        """Whether the stacked factors hold padding (not every slot filled at full rank)."""
        return (
            any(rank != self.rank for rank in self.ranks)
            or self.nb_leaves != self.rows.count * self.row_slots
            or self.nb_leaves != self.cols.count * self.col_slots
        )

    def left_mask(self) -> torch.Tensor:
        """Where the leaves' left factors lie in ``Lrow`` (bool, ``left_shape``)."""
        mask = torch.zeros(self.left_shape, dtype=torch.bool)
        for g, rank in enumerate(self.ranks):
            first = self.row_slot[g] * self.rank
            mask[self.row_of[g], :, first : first + rank] = True
        return mask

    def right_mask(self) -> torch.Tensor:
        """Where the leaves' right factors lie in ``Rcol`` (bool, ``right_shape``)."""
        mask = torch.zeros(self.right_shape, dtype=torch.bool)
        for g, rank in enumerate(self.ranks):
            first = self.col_slot[g] * self.rank
            mask[self.col_of[g], first : first + rank, :] = True
        return mask

    def gather_index(self) -> torch.Tensor:
        """``(rows.count * row_slots * rank,)``: for each row of the stacked ``Lrow``'s inner
        dimension, the row of the stacked ``Rcol @ X`` it multiplies (0 for padding)."""
        index = torch.zeros(self.rows.count, self.row_slots, self.rank, dtype=torch.long)
        for g in range(self.nb_leaves):
            first = (self.col_of[g] * self.col_slots + self.col_slot[g]) * self.rank
            index[self.row_of[g], self.row_slot[g]] = torch.arange(first, first + self.rank)
        return index.reshape(-1)

    def stack(
        self, factors: Sequence[tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Lrow, Rcol)`` (float64) from per-leaf ``(L, R)`` pairs indexed like the partition."""
        left = torch.zeros(self.left_shape, dtype=torch.float64)
        right = torch.zeros(self.right_shape, dtype=torch.float64)
        for g, (leaf, rank) in enumerate(zip(self.leaves, self.ranks, strict=True)):
            first = self.row_slot[g] * self.rank
            left[self.row_of[g], :, first : first + rank] = factors[leaf][0]
            first = self.col_slot[g] * self.rank
            right[self.col_of[g], first : first + rank, :] = factors[leaf][1]
        return left, right

    def unstack(self, left: torch.Tensor, right: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per leaf of the bucket, ``(L, R)`` views into the stacked factors."""
        pairs = []
        for g, rank in enumerate(self.ranks):
            first = self.row_slot[g] * self.rank
            leaf_left = left[self.row_of[g], :, first : first + rank]
            first = self.col_slot[g] * self.rank
            pairs.append((leaf_left, right[self.col_of[g], first : first + rank, :]))
        return pairs


def _rank_classes(ranks: list[tuple[int, int]]) -> list[list[int]]:
    """Split ``(rank, leaf)`` pairs into classes whose ranks are close enough to pad.

    A class starts at its largest rank ``k``; leaves down to ``k - max(2, k // 2)`` join it,
    so padding at most doubles (and usually adds far less to) a class's products.
    """
    classes: list[list[int]] = []
    top = None
    for rank, leaf in sorted(ranks, key=lambda pair: (-pair[0], pair[1])):
        if top is None or top - rank > max(2, top // 2):
            classes.append([])
            top = rank
        classes[-1].append(leaf)
    return classes


def _slots(keys: list[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """For items with block start ``keys[g]`` (items already in a fixed order): the distinct
    starts, each item's block number, and its position among the items of its block."""
    starts = sorted(set(keys))
    number = {start: position for position, start in enumerate(starts)}
    seen: dict[int, int] = {}
    slot = []
    for key in keys:
        slot.append(seen.get(key, 0))
        seen[key] = slot[-1] + 1
    return tuple(starts), tuple(number[key] for key in keys), tuple(slot)


def _low_rank_bucket(leaves: Sequence[Leaf], members: list[int]) -> LowRankBucket:
    """A bucket of same-shaped low-rank leaves: their block rows and columns, and their slots
    in each (same-shaped leaves of a partition have equal or disjoint row and column ranges)."""
    members = sorted(members, key=lambda i: (leaves[i].row_start, leaves[i].col_start))
    nb_rows, nb_cols = leaves[members[0]].shape
    row_starts, row_of, row_slot = _slots([leaves[i].row_start for i in members])
    by_column = sorted(range(len(members)), key=lambda g: (leaves[members[g]].col_start, g))
    col_starts, col_of_sorted, col_slot_sorted = _slots(
        [leaves[members[g]].col_start for g in by_column]
    )
    col_of = [0] * len(members)
    col_slot = [0] * len(members)
    for position, g in enumerate(by_column):
        col_of[g] = col_of_sorted[position]
        col_slot[g] = col_slot_sorted[position]
    ranks = tuple(leaves[i].rank for i in members)
    return LowRankBucket(
        leaves=tuple(members),
        ranks=ranks,
        rank=max(ranks),
        rows=BlockRange(row_starts, nb_rows),
        cols=BlockRange(col_starts, nb_cols),
        row_of=row_of,
        row_slot=row_slot,
        col_of=tuple(col_of),
        col_slot=tuple(col_slot),
    )


def _diagonals(leaves: Sequence[Leaf], indices: list[int]) -> list[list[int]]:
    """Leaves of one shape split into evenly spaced runs along diagonals (dense buckets)."""
    rows, cols = leaves[indices[0]].shape

    def key(index: int) -> tuple[int, int]:
        leaf = leaves[index]
        return (leaf.col_start * rows - leaf.row_start * cols, leaf.row_start)

    runs: list[list[int]] = []
    for index in sorted(indices, key=key):
        if runs and key(runs[-1][-1])[0] == key(index)[0]:
            candidate = [*runs[-1], index]
            row_range = BlockRange(tuple(leaves[i].row_start for i in candidate), rows)
            col_range = BlockRange(tuple(leaves[i].col_start for i in candidate), cols)
            if row_range.strided and col_range.strided:
                runs[-1].append(index)
                continue
        runs.append([index])
    # Short runs of small blocks go together into one gathered bucket: a copy is cheaper than
    # another call.
    long_runs = [run for run in runs if len(run) >= 4 or len(run) * rows * cols >= 4096]
    rest = [
        index
        for run in runs
        if not (len(run) >= 4 or len(run) * rows * cols >= 4096)
        for index in run
    ]
    return [*long_runs, rest] if rest else long_runs


def make_buckets(leaves: Sequence[Leaf]) -> list[DenseBucket | LowRankBucket]:
    """Group the leaves that hold parameters (dense, or rank >= 1) into buckets."""
    shapes: dict[tuple[bool, int, int], list[int]] = {}
    for index, leaf in enumerate(leaves):
        if leaf.dense or leaf.rank > 0:
            shapes.setdefault((leaf.dense, *leaf.shape), []).append(index)
    buckets: list[DenseBucket | LowRankBucket] = []
    for (dense, nb_rows, nb_cols), indices in sorted(shapes.items()):
        if dense:
            for run in _diagonals(leaves, indices):
                run = sorted(run, key=lambda i: (leaves[i].row_start, leaves[i].col_start))
                buckets.append(
                    DenseBucket(
                        leaves=tuple(run),
                        rows=BlockRange(tuple(leaves[i].row_start for i in run), nb_rows),
                        cols=BlockRange(tuple(leaves[i].col_start for i in run), nb_cols),
                    )
                )
        else:
            for members in _rank_classes([(leaves[i].rank, i) for i in indices]):
                buckets.append(_low_rank_bucket(leaves, members))
    return buckets
