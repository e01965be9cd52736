"""The batched product with an H-matrix: leaves grouped into buckets, one ``bmm`` pair per bucket.

A bucket holds leaves of one block shape and one (padded) rank. Where the leaves of a bucket lie
at evenly spaced rows and columns (the diagonals of a regular partition), their input and output
slices are strided views of the input and output, so nothing is copied; otherwise they are
gathered with ``index_select`` and scattered back with ``index_add_``. The forward and backward
products are written out in one ``autograd.Function`` so that the output and the input gradient
are accumulated in place, bucket after bucket, without autograd copying them for every bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from structurednets_hmat.partition import Leaf

__all__ = ["Bucket", "Run", "make_buckets", "multiply_buckets"]

#: Leaves on one evenly spaced diagonal that make a strided bucket of their own; shorter runs
#: of a shape and rank are gathered together (a copy is cheaper than another bmm call).
MIN_RUN = 4


@dataclass(frozen=True)
class Run:
    """Evenly spaced index blocks ``start + g * step + (0 .. size-1)`` for ``g < count``,
    or, if ``step`` is 0, arbitrary ones given by an index tensor of the bucket."""

    start: int
    step: int
    size: int
    count: int

    @property
    def strided(self) -> bool:
        return self.step > 0


@dataclass(frozen=True)
class Bucket:
    """Leaves multiplied together.

    Attributes:
        leaves: indices into the partition's leaves, in storage order.
        dense: whether the leaves are dense blocks (else low-rank ``L @ R``).
        nb_rows, nb_cols: the common block shape.
        rank: the padded rank (largest rank of the bucket); 0 for dense buckets.
        ranks: each leaf's own rank (low-rank buckets).
        rows, cols: where the blocks' rows and columns lie (strided or gathered).
    """

    leaves: tuple[int, ...]
    dense: bool
    nb_rows: int
    nb_cols: int
    rank: int
    ranks: tuple[int, ...]
    rows: Run
    cols: Run

    @property
    def nb_leaves(self) -> int:
        return len(self.leaves)

    @property
    def ragged(self) -> bool:
        return any(rank != self.rank for rank in self.ranks)

    @property
    def nb_left(self) -> int:
        """Scalars of the stacked left factors (or dense blocks)."""
        if self.dense:
            return self.nb_leaves * self.nb_rows * self.nb_cols
        return sum(self.ranks) * self.nb_rows

    @property
    def nb_right(self) -> int:
        return 0 if self.dense else sum(self.ranks) * self.nb_cols


def _rank_buckets(ranks: list[tuple[int, int]]) -> list[list[int]]:
    """Split ``(rank, leaf)`` pairs into groups whose ranks are close enough to pad.

    A group starts at its largest rank ``k``; leaves down to ``k - max(2, k // 4)`` join it,
    so padding wastes at most about a quarter of the bucket's products.
    """
    groups: list[list[int]] = []
    top = None
    for rank, leaf in sorted(ranks, key=lambda pair: (-pair[0], pair[1])):
        if top is None or top - rank > max(2, top // 4):
            groups.append([])
            top = rank
        groups[-1].append(leaf)
    return groups


def _runs(leaves: Sequence[Leaf], indices: list[int]) -> tuple[list[list[int]], list[int]]:
    """Split leaves of one shape into evenly spaced diagonals of at least ``MIN_RUN`` leaves;
    returns those runs and the leaves left over."""
    rows, cols = leaves[indices[0]].shape

    def diagonal(index: int) -> tuple[int, int]:
        leaf = leaves[index]
        return (leaf.col_start * rows - leaf.row_start * cols, leaf.row_start)

    runs: list[list[int]] = []
    rest: list[int] = []
    ordered = sorted(indices, key=diagonal)
    position = 0
    while position < len(ordered):
        run = [ordered[position]]
        key = diagonal(ordered[position])[0]
        step = None
        for index in ordered[position + 1 :]:
            if diagonal(index)[0] != key:
                break
            last = leaves[run[-1]]
            row_step = leaves[index].row_start - last.row_start
            col_step = leaves[index].col_start - last.col_start
            if row_step < rows or col_step < cols or (step and step != (row_step, col_step)):
                break
            step = (row_step, col_step)
            run.append(index)
        position += len(run)
        if len(run) >= MIN_RUN:
            runs.append(run)
        else:
            rest.extend(run)
    return runs, rest


def _run(starts: list[int], size: int) -> Run:
    if len(starts) == 1:
        return Run(starts[0], size, size, 1)
    step = starts[1] - starts[0]
    if step >= size and all(b - a == step for a, b in zip(starts, starts[1:], strict=False)):
        return Run(starts[0], step, size, len(starts))
    return Run(0, 0, size, len(starts))


def make_buckets(leaves: Sequence[Leaf]) -> list[Bucket]:
    """Group the leaves that hold parameters (dense, or rank >= 1) into buckets."""
    shapes: dict[tuple[bool, int, int], list[int]] = {}
    for index, leaf in enumerate(leaves):
        if leaf.dense or leaf.rank > 0:
            shapes.setdefault((not leaf.dense, *leaf.shape), []).append(index)
    buckets = []
    for (low_rank, nb_rows, nb_cols), indices in sorted(shapes.items()):
        if low_rank:
            groups = _rank_buckets([(leaves[i].rank, i) for i in indices])
        else:
            groups = [indices]
        for group in groups:
            runs, rest = _runs(leaves, group)
            for members in [*runs, rest]:
                if not members:
                    continue
                members = sorted(members, key=lambda i: (leaves[i].row_start, leaves[i].col_start))
                ranks = tuple(leaves[i].rank for i in members) if low_rank else ()
                buckets.append(
                    Bucket(
                        leaves=tuple(members),
                        dense=not low_rank,
                        nb_rows=nb_rows,
                        nb_cols=nb_cols,
                        rank=max(ranks) if low_rank else 0,
                        ranks=ranks,
                        rows=_run([leaves[i].row_start for i in members], nb_rows),
                        cols=_run([leaves[i].col_start for i in members], nb_cols),
                    )
                )
    return buckets


def block_indices(leaves: Sequence[Leaf], bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` index tensors of shape ``(G, nb_rows)`` and ``(G, nb_cols)``."""
    row_starts = torch.tensor([leaves[i].row_start for i in bucket.leaves])
    col_starts = torch.tensor([leaves[i].col_start for i in bucket.leaves])
    rows = row_starts[:, None] + torch.arange(bucket.nb_rows)
    cols = col_starts[:, None] + torch.arange(bucket.nb_cols)
    return rows, cols


def _blocks(matrix: torch.Tensor, run: Run, index: torch.Tensor | None) -> torch.Tensor:
    """The ``(G, size, batch)`` row blocks of a contiguous ``(n, batch)`` matrix: a strided view,
    or a gathered copy."""
    batch = matrix.shape[1]
    if run.strided:
        return matrix.as_strided(
            (run.count, run.size, batch),
            (run.step * batch, batch, 1),
            matrix.storage_offset() + run.start * batch,
        )
    return matrix.index_select(0, index.reshape(-1)).view(run.count, run.size, batch)


def _accumulate(
    matrix: torch.Tensor, run: Run, index: torch.Tensor | None, blocks: torch.Tensor
) -> None:
    """``matrix[rows of the blocks] += blocks`` in place, for ``blocks`` of shape (G, size, batch)."""
    if run.strided:
        _blocks(matrix, run, None).add_(blocks)
    else:
        matrix.index_add_(0, index.reshape(-1), blocks.reshape(-1, matrix.shape[1]))


@dataclass(frozen=True)
class BucketOperands:
    """A bucket with its index tensors (for gathered runs) on the right device."""

    bucket: Bucket
    row_index: torch.Tensor | None
    col_index: torch.Tensor | None


class _HMatrixProduct(torch.autograd.Function):
    """``Yt = W @ Xt`` for ``Xt`` of shape ``(input_dim, batch)``, ``W`` given by its buckets.

    Inputs after ``Xt``: per bucket, ``(D,)`` of shape ``(G, r, c)`` for a dense bucket or
    ``(L, R)`` of shapes ``(G, r, k)`` and ``(G, k, c)`` for a low-rank one.
    """

    @staticmethod
    def forward(ctx, operands, output_dim, Xt, *factors):
        # Computed in the factors' dtype (under autocast too), so that backward can reuse it.
        Xt = Xt.to(factors[0].dtype).contiguous()
        Yt = Xt.new_zeros(output_dim, Xt.shape[1])
        intermediates = []
        position = 0
        for operand in operands:
            bucket = operand.bucket
            X = _blocks(Xt, bucket.cols, operand.col_index)
            if bucket.dense:
                Y = torch.bmm(factors[position], X)
                intermediates.append(None)
                position += 1
            else:
                T = torch.bmm(factors[position + 1], X)
                Y = torch.bmm(factors[position], T)
                intermediates.append(T)
                position += 2
            _accumulate(Yt, bucket.rows, operand.row_index, Y)
        ctx.operands = operands
        ctx.intermediates = intermediates
        ctx.save_for_backward(Xt, *factors)
        return Yt

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dYt):
        Xt, *factors = ctx.saved_tensors
        dYt = dYt.contiguous()
        need_input = ctx.needs_input_grad[2]
        dXt = torch.zeros_like(Xt) if need_input else None
        gradients: list[torch.Tensor | None] = []
        position = 0
        for operand, T in zip(ctx.operands, ctx.intermediates, strict=True):
            bucket = operand.bucket
            dY = _blocks(dYt, bucket.rows, operand.row_index)
            X = _blocks(Xt, bucket.cols, operand.col_index)
            if bucket.dense:
                D = factors[position]
                gradients.append(
                    torch.bmm(dY, X.transpose(1, 2)) if ctx.needs_input_grad[3 + position] else None
                )
                if need_input:
                    _accumulate(dXt, bucket.cols, operand.col_index, torch.bmm(D.transpose(1, 2), dY))
                position += 1
            else:
                L, R = factors[position], factors[position + 1]
                dT = torch.bmm(L.transpose(1, 2), dY)
                gradients.append(
                    torch.bmm(dY, T.transpose(1, 2)) if ctx.needs_input_grad[3 + position] else None
                )
                gradients.append(
                    torch.bmm(dT, X.transpose(1, 2))
                    if ctx.needs_input_grad[4 + position]
                    else None
                )
                if need_input:
                    _accumulate(dXt, bucket.cols, operand.col_index, torch.bmm(R.transpose(1, 2), dT))
                position += 2
        return (None, None, dXt, *gradients)


def multiply_buckets(
    operands: Sequence[BucketOperands],
    output_dim: int,
    Xt: torch.Tensor,
    factors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``W @ Xt`` (shape ``(output_dim, batch)``) for the H-matrix given by buckets and factors."""
    with torch.autocast(Xt.device.type, enabled=False):
        return _HMatrixProduct.apply(tuple(operands), output_dim, Xt, *factors)
