"""The Monarch product ``U @ W.T`` as two batched matrix products with a permutation between.

The factors are stored block by block (see :mod:`structurednets_monarch.layout`):

- ``right``: ``(k1, q r, p)`` and ``right_short``: ``(k2, q r, p - 1)``, the blocks of ``R``;
  rows ``s r : (s + 1) r`` of block ``j`` are the right factor of block pair ``(s, j)``.
- ``left``: ``(q1, l, k r)`` and ``left_short``: ``(q2, l - 1, k r)``, the blocks of ``L``;
  columns ``j r : (j + 1) r`` of block ``s`` are the left factor of block pair ``(s, j)``.

``right_short`` and ``left_short`` are ``None`` when the sizes divide evenly. Autograd
differentiates through ``torch.bmm``, so the backward is batched products too; no dense
``W`` is formed.
"""

from __future__ import annotations

import torch

from structurednets_monarch.layout import MonarchShape

__all__ = ["monarch_dense", "monarch_multiply"]


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    The gradient of the permuted intermediate comes back as a strided view; at rank 1 no
    reshape copies it, and ``torch.bmm`` on the CPU then multiplies it block by block
    through per-block copies (measured 15x slower than one contiguous copy at 512 x 512).
    """

    @staticmethod
    def forward(ctx, Z: torch.Tensor) -> torch.Tensor:
        return Z.view_as(Z)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        return gradient.contiguous()


def _first_stage(
    U: torch.Tensor, shape: MonarchShape, right: torch.Tensor, right_short: torch.Tensor | None
) -> torch.Tensor:
    """``R_j @ U[:, block j].T`` for every input block, stacked as ``(k, q r, batch)``.

    The batch is the last axis so that the permutation that follows moves contiguous runs of
    ``r * batch`` numbers; ``U.T`` is a view that ``bmm`` reads as a transposed operand.
    """
    batch = U.shape[0]
    k1, p = shape.nb_long_input_blocks, shape.input_block_size
    columns = U.T
    Z = torch.bmm(right, columns[: k1 * p].reshape(k1, p, batch))
    if right_short is None:
        return Z
    rest = columns[k1 * p :].reshape(right_short.shape[0], p - 1, batch)
    return torch.cat((Z, torch.bmm(right_short, rest)))


def monarch_multiply(
    U: torch.Tensor,
    shape: MonarchShape,
    right: torch.Tensor,
    right_short: torch.Tensor | None,
    left: torch.Tensor,
    left_short: torch.Tensor | None,
) -> torch.Tensor:
    """``U @ W.T`` for ``U`` of shape ``(batch, input_dim)``; returns ``(batch, output_dim)``.

    Costs ``batch * r * (q * input_dim + k * output_dim)`` multiply-adds, the layer's number
    of weight scalars per sample, plus two permuting copies of ``batch * (k q r + output_dim)``
    numbers.
    """
    batch = U.shape[0]
    k, q, r = shape.nb_input_blocks, shape.nb_output_blocks, shape.rank
    Z = _ContiguousGradient.apply(_first_stage(U, shape, right, right_short))
    # (k, q, r, batch) -> (q, k, r, batch): the permutation P between the factors.
    Z = Z.reshape(k, q, r, batch).transpose(0, 1).reshape(q, k * r, batch).transpose(1, 2)
    q1, height = shape.nb_long_output_blocks, shape.output_block_size
    Y = torch.bmm(Z[:q1], left.transpose(1, 2)).transpose(0, 1).reshape(batch, q1 * height)
    if left_short is None:
        return Y
    rest = torch.bmm(Z[q1:], left_short.transpose(1, 2)).transpose(0, 1)
    return torch.cat((Y, rest.reshape(batch, (q - q1) * (height - 1))), dim=1)


def monarch_dense(
    shape: MonarchShape,
    right: torch.Tensor,
    right_short: torch.Tensor | None,
    left: torch.Tensor,
    left_short: torch.Tensor | None,
) -> torch.Tensor:
    """The dense ``W`` (output_dim x input_dim), block pair by block pair (a reference)."""
    k, q, r = shape.nb_input_blocks, shape.nb_output_blocks, shape.rank
    rights = [*right.unbind(0), *([] if right_short is None else right_short.unbind(0))]
    lefts = [*left.unbind(0), *([] if left_short is None else left_short.unbind(0))]
    rows = []
    for s in range(q):
        left_s = lefts[s].reshape(-1, k, r)
        rows.append(
            torch.cat(
                [left_s[:, j] @ rights[j].reshape(q, r, -1)[s] for j in range(k)],
                dim=1,
            )
        )
    return torch.cat(rows, dim=0)
