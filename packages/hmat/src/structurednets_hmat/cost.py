"""The multiply-adds of an H-matrix layer's products, counted from its partition alone.

The count follows the kernels (:mod:`structurednets_hmat.kernels`). With few leaves the
product runs leaf by leaf (:func:`~structurednets_hmat.kernels.leaf_by_leaf`): a low-rank leaf
of rank ``k`` and shape ``(r, c)`` costs ``batch * k * (r + c)`` forward (``R x``, then ``L``)
and a dense one ``batch * r * c``. Otherwise it runs bucket by bucket, and a low-rank bucket's
batched products include its padding: ``batch * (J * col_slots * k * c + I * r * row_slots * k)``
forward, for ``J`` block columns and ``I`` block rows; a dense bucket of ``G`` blocks costs
``batch * G * r * c``. The backward (input gradient and factor gradients) does two products
of the forward's size for each of the forward's: twice its count. Gathers, scatters and the
padding's zeros are not multiply-adds and are not counted.

>>> from structurednets_hmat.partition import HMatrixPartition
>>> one_block = HMatrixPartition.build(64, 32, min_block_size=64).with_ranks([3])
>>> partition_cost(one_block, 10)  # 10 * 3 * (64 + 32)
Cost(forward=2880, backward=5760)
"""

from __future__ import annotations

import math
import numbers

from structurednets.cost import DEFAULT_COST_BATCH_SIZE
from structurednets.plugin import Cost, dense_cost
from structurednets_hmat.buckets import make_buckets
from structurednets_hmat.kernels import leaf_by_leaf
from structurednets_hmat.partition import HMatrixPartition

__all__ = ["buckets_forward_cost", "check_max_cost_ratio", "cost_ratio", "partition_cost"]


def buckets_forward_cost(buckets, leaves) -> int:
    """Multiply-adds per input (batch of 1) of the forward product over these buckets."""
    if leaf_by_leaf(buckets):
        return sum(leaves[i].nb_parameters for bucket in buckets for i in bucket.leaves)
    total = 0
    for bucket in buckets:
        rows, cols = bucket.shape
        if bucket.dense:
            total += bucket.nb_leaves * rows * cols
        else:
            total += bucket.cols.count * bucket.col_slots * bucket.rank * cols
            total += bucket.rows.count * rows * bucket.row_slots * bucket.rank
    return total


def partition_cost(partition: HMatrixPartition, batch_size: int) -> Cost:
    """:class:`~structurednets.Cost` of the layer's product with ``batch_size`` inputs:
    the forward's multiply-adds, and twice that for the backward (see the module)."""
    per_input = buckets_forward_cost(make_buckets(partition.leaves), partition.leaves)
    return Cost(batch_size * per_input, 2 * batch_size * per_input)


def cost_ratio(partition: HMatrixPartition) -> float:
    """``layer.cost_ratio()`` of a layer of this partition: forward plus backward
    multiply-adds at batch 256 against ``nn.Linear``'s (:func:`~structurednets.dense_cost`)."""
    dense = dense_cost(partition.input_dim, partition.output_dim, DEFAULT_COST_BATCH_SIZE)
    return partition_cost(partition, DEFAULT_COST_BATCH_SIZE).ratio(dense)


def check_max_cost_ratio(value: object) -> float | None:
    """``max_cost_ratio``: ``None`` or a positive finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"max_cost_ratio must be None or a positive number, got {value!r} "
            f"({type(value).__name__})"
        )
    if not (float(value) > 0.0 and math.isfinite(float(value))):
        raise ValueError(f"max_cost_ratio must be a positive finite number, got {value!r}")
    return float(value)
