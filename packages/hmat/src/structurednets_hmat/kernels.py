"""The batched product with an H-matrix, bucket by bucket, and its backward.

A low-rank bucket's product reads the input once and writes the output once: one batched
product over the block columns gives every leaf's ``R @ x``; these small results are gathered
per block row, where the stacked left factors of the row give the row's output in one more
batched product. A dense bucket is one batched product.

Strided blocks are views of the input and output, so nothing is copied; others are gathered
with ``index_select`` and scattered with ``index_add_``. Forward and backward are written out in
one ``autograd.Function``, so that the output and the input gradient are accumulated in place
(``baddbmm_``), bucket after bucket, without autograd copying them for every bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from structurednets_hmat.buckets import BlockRange, DenseBucket, LowRankBucket

__all__ = [
    "LEAF_BY_LEAF_MAX_LEAVES",
    "DenseOperands",
    "LeafOperands",
    "LowRankOperands",
    "leaf_by_leaf",
    "leaf_operands",
    "multiply_buckets",
    "multiply_leaves",
]

LEAF_BY_LEAF_MAX_LEAVES = 8
"""Partitions with at most this many leaves that hold parameters run leaf by leaf (two plain
products per low-rank leaf, on the input and output as they are); larger ones bucket by bucket."""


def leaf_by_leaf(buckets: Sequence[DenseBucket | LowRankBucket]) -> bool:
    """Whether the product over these buckets runs leaf by leaf (few leaves)."""
    return sum(bucket.nb_leaves for bucket in buckets) <= LEAF_BY_LEAF_MAX_LEAVES


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


@dataclass(frozen=True)
class LeafOperands:
    """One leaf of the leaf-by-leaf product: where its factors lie in the stacked factors.

    ``left``, ``right`` are positions in the list of stacked factors (``right`` is ``-1`` for a
    dense leaf, whose block is ``factors[left][block]``); a low-rank leaf's ``L`` is
    ``factors[left][block_row, :, left_first : left_first + rank]`` and its ``R``
    ``factors[right][block_col, right_first : right_first + rank]``.
    """

    rows: tuple[int, int]
    cols: tuple[int, int]
    left: int
    right: int
    block_row: int
    left_first: int
    block_col: int
    right_first: int
    rank: int

    def factors(self, factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``(D,)`` or ``(L, R)``: views into the stacked factors."""
        if self.right < 0:
            return (factors[self.left][self.block_row],)
        first, last = self.left_first, self.left_first + self.rank
        left = factors[self.left][self.block_row, :, first:last]
        first, last = self.right_first, self.right_first + self.rank
        return left, factors[self.right][self.block_col, first:last]


def leaf_operands(
    buckets: Sequence[DenseBucket | LowRankBucket], leaves: Sequence
) -> tuple[LeafOperands, ...]:
    """Every leaf of the buckets, with its factors' place in the stacked factors."""
    operands = []
    position = 0
    for bucket in buckets:
        for g, index in enumerate(bucket.leaves):
            leaf = leaves[index]
            spans = ((leaf.row_start, leaf.row_stop), (leaf.col_start, leaf.col_stop))
            if bucket.dense:
                operands.append(LeafOperands(*spans, position, -1, g, 0, 0, 0, 0))
                continue
            operands.append(
                LeafOperands(
                    *spans,
                    position,
                    position + 1,
                    bucket.row_of[g],
                    bucket.row_slot[g] * bucket.rank,
                    bucket.col_of[g],
                    bucket.col_slot[g] * bucket.rank,
                    bucket.ranks[g],
                )
            )
        position += 1 if bucket.dense else 2
    return tuple(operands)


class _LeafProduct(torch.autograd.Function):
    """``Y = X @ W.T`` for ``X`` of shape ``(batch, input_dim)``, leaf by leaf: each low-rank
    leaf adds ``(X[:, cols] @ R.T) @ L.T`` into ``Y[:, rows]`` in place (column slices of a
    row-major matrix are plain strided operands of ``addmm``: nothing is copied)."""

    @staticmethod
    def forward(ctx, operands, output_dim, X, *factors):
        X = X.to(factors[0].dtype).contiguous()
        Y = X.new_zeros(X.shape[0], output_dim)
        saved = []
        for operand in operands:
            (r0, r1), (c0, c1) = operand.rows, operand.cols
            pieces = operand.factors(factors)
            if len(pieces) == 1:
                Y[:, r0:r1].addmm_(X[:, c0:c1], pieces[0].T)
                saved.append(None)
            else:
                T = X[:, c0:c1] @ pieces[1].T  # (batch, rank)
                Y[:, r0:r1].addmm_(T, pieces[0].T)
                saved.append(T)
        ctx.operands = operands
        ctx.intermediates = saved
        ctx.save_for_backward(X, *factors)
        return Y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dY):
        X, *factors = ctx.saved_tensors
        dY = dY.contiguous()
        dX = torch.zeros_like(X) if ctx.needs_input_grad[2] else None
        needs = ctx.needs_input_grad[3:]
        grads = [
            torch.zeros_like(f) if need else None for f, need in zip(factors, needs, strict=True)
        ]
        for operand, T in zip(ctx.operands, ctx.intermediates, strict=True):
            (r0, r1), (c0, c1) = operand.rows, operand.cols
            pieces = operand.factors(factors)
            dY_rows, X_cols = dY[:, r0:r1], X[:, c0:c1]
            if T is None:
                if grads[operand.left] is not None:
                    grads[operand.left][operand.block_row].addmm_(dY_rows.T, X_cols)
                if dX is not None:
                    dX[:, c0:c1].addmm_(dY_rows, pieces[0])
                continue
            dT = dY_rows @ pieces[0]  # (batch, rank)
            left_grad, right_grad = grads[operand.left], grads[operand.right]
            if left_grad is not None:
                first, last = operand.left_first, operand.left_first + operand.rank
                left_grad[operand.block_row, :, first:last].addmm_(dY_rows.T, T)
            if right_grad is not None:
                first, last = operand.right_first, operand.right_first + operand.rank
                right_grad[operand.block_col, first:last].addmm_(dT.T, X_cols)
            if dX is not None:
                dX[:, c0:c1].addmm_(dT, pieces[1])
        return (None, None, dX, *grads)


def multiply_leaves(
    operands: Sequence[LeafOperands],
    output_dim: int,
    X: torch.Tensor,
    factors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``X @ W.T`` (shape ``(batch, output_dim)``) for ``X`` of shape ``(batch, input_dim)``,
    leaf by leaf (see :func:`leaf_by_leaf`)."""
    autocast = torch.autocast(X.device.type, enabled=False) if _autocasting(X) else nullcontext()
    with autocast:
        return _LeafProduct.apply(tuple(operands), output_dim, X, *factors)


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
