"""The batched product with an H-matrix: leaves grouped into buckets, a few ``bmm`` per bucket.

A *low-rank bucket* holds the leaves of one block shape and similar ranks (padded to the
largest), typically one level of the partition. Its product reads the input once and writes the
output once: the right factors of all leaves in a block column are stacked, so one batched
product over the block columns gives every leaf's ``R @ x``; these small results are gathered
per block row, where the stacked left factors of the row give the row's output in one more
batched product. A *dense bucket* holds dense leaves of one shape, one batched product.

Evenly spaced blocks (a regular partition) are strided views of the input and output, so
nothing is copied; others are gathered with ``index_select`` and scattered with ``index_add_``.
Forward and backward are written out in one ``autograd.Function``, so that the output and the
input gradient are accumulated in place (``baddbmm_``), bucket after bucket, without autograd
copying them for every bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from structurednets_hmat.partition import Leaf

__all__ = [
    "BlockRange",
    "DenseBucket",
    "DenseOperands",
    "LowRankBucket",
    "LowRankOperands",
    "make_buckets",
    "multiply_buckets",
]


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


# -- the product ------------------------------------------------------------------------------


def _blocks(matrix: torch.Tensor, blocks: BlockRange, index: torch.Tensor | None) -> torch.Tensor:
    """The ``(count, size, batch)`` row blocks of a contiguous ``(n, batch)`` matrix: a strided
    view (``narrow`` and ``unfold``, so it stays a view that in-place products can write
    into), or a gathered copy (``index`` of shape ``(count, size)``)."""
    if blocks.strided:
        span = (blocks.count - 1) * blocks.step + blocks.size
        window = matrix.narrow(0, blocks.starts[0], span)
        return window.unfold(0, blocks.size, blocks.step).transpose(1, 2)
    batch = matrix.shape[1]
    return matrix.index_select(0, index.reshape(-1)).view(blocks.count, blocks.size, batch)


def _add_product(
    matrix: torch.Tensor,
    blocks: BlockRange,
    index: torch.Tensor | None,
    left: torch.Tensor,
    right: torch.Tensor,
) -> None:
    """``matrix[blocks] += left @ right`` in place, for a product of shape (count, size, batch).

    Strided blocks are accumulated by ``baddbmm_`` straight into the view, so the product is
    never allocated; gathered ones are scattered back with ``index_add_``.
    """
    if blocks.strided:
        _blocks(matrix, blocks, None).baddbmm_(left, right)
    else:
        product = torch.bmm(left, right)
        rows = product.shape[0] * product.shape[1]
        matrix.index_add_(0, index.reshape(-1), product.reshape(rows, matrix.shape[1]))


@dataclass(frozen=True)
class DenseOperands:
    """A dense bucket with its index tensors (``None`` where strided) on the input's device."""

    bucket: DenseBucket
    row_index: torch.Tensor | None
    col_index: torch.Tensor | None

    nb_factors = 1

    def forward(self, Xt, Yt, D):
        X = _blocks(Xt, self.bucket.cols, self.col_index)
        _add_product(Yt, self.bucket.rows, self.row_index, D, X)
        return None

    def backward(self, Xt, dYt, dXt, saved, D, needs):
        dY = _blocks(dYt, self.bucket.rows, self.row_index)
        dD = None
        if needs[0]:
            dD = torch.bmm(dY, _blocks(Xt, self.bucket.cols, self.col_index).transpose(1, 2))
        if dXt is not None:
            _add_product(dXt, self.bucket.cols, self.col_index, D.transpose(1, 2), dY)
        return (dD,)


@dataclass(frozen=True)
class LowRankOperands:
    """A low-rank bucket with its index tensors on the input's device."""

    bucket: LowRankBucket
    row_index: torch.Tensor | None
    col_index: torch.Tensor | None
    gather_index: torch.Tensor

    nb_factors = 2

    def forward(self, Xt, Yt, Lrow, Rcol):
        bucket = self.bucket
        X = _blocks(Xt, bucket.cols, self.col_index)  # (J, c, B)
        T = torch.bmm(Rcol, X)  # (J, col_slots * k, B): every leaf's R @ x
        batch = T.shape[2]  # explicit sizes throughout: the batch may be empty
        Trow = T.reshape(T.shape[0] * T.shape[1], batch).index_select(0, self.gather_index)
        Trow = Trow.view(bucket.rows.count, bucket.row_slots * bucket.rank, batch)
        _add_product(Yt, bucket.rows, self.row_index, Lrow, Trow)
        return Trow

    def backward(self, Xt, dYt, dXt, Trow, Lrow, Rcol, needs):
        bucket = self.bucket
        batch = dYt.shape[1]
        dY = _blocks(dYt, bucket.rows, self.row_index)  # (I, r, B)
        dLrow = torch.bmm(dY, Trow.transpose(1, 2)) if needs[0] else None
        dTrow = torch.bmm(Lrow.transpose(1, 2), dY)  # (I, row_slots * k, B)
        dT = dTrow.new_zeros(Rcol.shape[0] * Rcol.shape[1], batch)
        dT.index_add_(0, self.gather_index, dTrow.view(dTrow.shape[0] * dTrow.shape[1], batch))
        dT = dT.view(Rcol.shape[0], Rcol.shape[1], batch)
        dRcol = None
        if needs[1]:
            dRcol = torch.bmm(dT, _blocks(Xt, bucket.cols, self.col_index).transpose(1, 2))
        if dXt is not None:
            _add_product(dXt, bucket.cols, self.col_index, Rcol.transpose(1, 2), dT)
        return (dLrow, dRcol)


class _HMatrixProduct(torch.autograd.Function):
    """``Yt = W @ Xt`` for ``Xt`` of shape ``(input_dim, batch)``, ``W`` given by its buckets;
    the inputs after ``Xt`` are each bucket's stacked factors (``D``, or ``Lrow, Rcol``)."""

    @staticmethod
    def forward(ctx, operands, output_dim, Xt, *factors):
        # Computed in the factors' dtype (under autocast too), so that backward can reuse it.
        Xt = Xt.to(factors[0].dtype).contiguous()
        Yt = Xt.new_zeros(output_dim, Xt.shape[1])
        saved = []
        position = 0
        for operand in operands:
            count = operand.nb_factors
            saved.append(operand.forward(Xt, Yt, *factors[position : position + count]))
            position += count
        ctx.operands = operands
        ctx.intermediates = saved
        ctx.save_for_backward(Xt, *factors)
        return Yt

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dYt):
        Xt, *factors = ctx.saved_tensors
        dYt = dYt.contiguous()
        dXt = torch.zeros_like(Xt) if ctx.needs_input_grad[2] else None
        gradients: list[torch.Tensor | None] = []
        position = 0
        for operand, saved in zip(ctx.operands, ctx.intermediates, strict=True):
            count = operand.nb_factors
            needs = ctx.needs_input_grad[3 + position : 3 + position + count]
            gradients += operand.backward(
                Xt, dYt, dXt, saved, *factors[position : position + count], needs
            )
            position += count
        return (None, None, dXt, *gradients)


def multiply_buckets(
    operands: Sequence[DenseOperands | LowRankOperands],
    output_dim: int,
    Xt: torch.Tensor,
    factors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``W @ Xt`` (shape ``(output_dim, batch)``) for the H-matrix given by buckets and factors."""
    autocast = torch.autocast(Xt.device.type, enabled=False) if _autocasting(Xt) else nullcontext()
    with autocast:
        return _HMatrixProduct.apply(tuple(operands), output_dim, Xt, *factors)


def _autocasting(tensor: torch.Tensor) -> bool:
    """Whether autocast is on for the tensor's device (devices without autocast: no)."""
    try:
        return torch.is_autocast_enabled(tensor.device.type)
    except RuntimeError:  # e.g. the meta device has no autocast
        return False
