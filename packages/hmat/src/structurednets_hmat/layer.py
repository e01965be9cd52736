"""H-matrix layer: ``W`` is a hierarchical matrix, low-rank far from the diagonal."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from structurednets.plugin import Cost, Layout, StructuredLayer, dense_init_std
from structurednets_hmat.buckets import make_buckets
from structurednets_hmat.cost import check_max_cost_ratio, partition_cost
from structurednets_hmat.fit import fit_hmat
from structurednets_hmat.hmatrix import HMatrix
from structurednets_hmat.kernels import (
    DenseOperands,
    LowRankOperands,
    leaf_by_leaf,
    leaf_operands,
    multiply_buckets,
    multiply_leaves,
)
from structurednets_hmat.layout import (
    block_partition,
    layer_partition,
    partition_from_json,
    partition_to_json,
    require_one_block,
)
from structurednets_hmat.partition import HMatrixPartition

__all__ = ["HMatLayer"]


class HMatLayer(StructuredLayer):
    """Hierarchical-matrix layer: ``W`` is split into blocks, low rank away from the diagonal.

    The block partition (see :class:`~structurednets_hmat.HMatrixPartition`) halves row and
    column index ranges recursively; blocks that are far from the diagonal relative to their
    size (``max(diam(rows), diam(cols)) <= 2 * eta * dist(rows, cols)``) stop there, the others
    are split down to ``min_block_size``. Each leaf holds ``L @ R`` of its own rank, or a dense
    block where that is cheaper. Forward and backward cost ``O(batch * nb_parameters)``, in one
    pair of batched products per group of same-shaped leaves.

    Args:
        input_dim, output_dim, nb_params_share, use_bias, initial_weight_matrix, initial_bias:
            as for every :class:`~structurednets.StructuredLayer`. ``initial_weight_matrix`` is
            approximated by :func:`~structurednets_hmat.fit_hmat`: the SVD of every leaf,
            then a greedy allocation of the budget over all leaves. With neither
            ``min_block_size`` nor ``merge_blocks`` given, the fit searches ``min_block_size``
            16 and 2 and merged blocks and keeps the most accurate (a finer or merged candidate
            only if it gains more than 0.1 %); passing either option skips the search.
        eta: admissibility parameter (default 0.5); larger gives bigger low-rank blocks.
        min_block_size: index ranges are halved only while both halves keep at least this
            many indices (default 16, or searched when fitting; see above).
        hmatrix: an :class:`~structurednets_hmat.HMatrix` (partition and factors) to start from.
        partition: the partition with ranks to build, with random factors: an
            :class:`~structurednets_hmat.HMatrixPartition` (e.g. ``other_layer.partition``) or
            its layout form (``other_layer.layout.sizes["partition"]``, what
            ``structurednets.create("hmat", layout=...)`` passes).
        merge_blocks: when fitting ``initial_weight_matrix``, also consider keeping split blocks
            whole, up to the whole matrix as one low-rank block (see
            :func:`~structurednets_hmat.fit_hmat`): never worse than plain low rank, slower
            to fit. Default ``False``, or searched when fitting (see above).
        max_cost_ratio: when fitting ``initial_weight_matrix``, a bound on the result's
            :meth:`cost_ratio` (forward plus backward multiply-adds at batch 256 against
            ``nn.Linear``): the fit's candidates are allocated within it, and ``ValueError``
            names the smallest reachable ratio if none can be. A fit control, not part of
            the layout; checked but otherwise unused without a matrix.

    Without ``initial_weight_matrix``, ``hmatrix`` or ``partition``, every leaf starts at rank 1
    and ranks grow evenly (by ``rank / min(rows, cols)``) until the budget is full; factors are
    random with ``nn.Linear``'s scale. So a random layer needs a budget of rank 1 in every
    block, while a fitted one may leave blocks at rank 0 and needs only one block of rank 1.

    Shape:
        input: ``(..., input_dim)``; output: ``(..., output_dim)``.

    Attributes:
        partition: the :class:`~structurednets_hmat.HMatrixPartition` with every leaf's rank;
            ``layout.sizes["partition"]`` is its JSON form.
        buckets: the leaves grouped for the batched product (derived from ``partition``).
        left_factors, right_factors: per low-rank bucket, the flat non-padding entries of the
            stacked left and right factors.
        dense_blocks: per dense bucket, the ``(leaves, rows, cols)`` blocks.
        bias: the learnable ``(output_dim,)`` bias, or ``None``.

    Example:
        >>> layer = HMatLayer(512, 512, nb_params_share=0.1)
        >>> len(layer.partition.leaves), layer.nb_weight_parameters
        (250, 26208)
        >>> layer(torch.randn(8, 512)).shape
        torch.Size([8, 512])
        >>> layer.layout.sizes["partition"]["leaves"][0]  # rows, cols, level, admissible, kind, rank
        (0, 16, 0, 16, 5, False, 'lowrank', 2)
        >>> twin = structurednets.create("hmat", layout=layer.layout)  # unfitted, same shapes
        >>> _ = twin.load_state_dict(layer.state_dict())
        >>> torch.equal(twin.to_dense(), layer.to_dense())
        True
    """

    structure_name = "hmat"
    accepts_max_cost_ratio = True

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        nb_params_share: float,
        use_bias: bool = True,
        initial_weight_matrix: object = None,
        initial_bias: object = None,
        *,
        eta: float | None = None,
        min_block_size: int | None = None,
        hmatrix: HMatrix | None = None,
        partition: HMatrixPartition | Mapping[str, object] | None = None,
        merge_blocks: bool | None = None,
        max_cost_ratio: float | None = None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, initial_bias)
        target = self.checked_weight_matrix(initial_weight_matrix)
        check_max_cost_ratio(max_cost_ratio)
        if target is not None and (hmatrix is not None or partition is not None):
            raise ValueError(
                "pass either initial_weight_matrix or hmatrix/partition, not both "
                "(structurednets_hmat.fit_hmat fits a matrix on a given partition)"
            )
        if target is None:
            ranked = layer_partition(
                self.input_dim,
                self.output_dim,
                self.nb_params_share,
                eta=eta,
                min_block_size=min_block_size,
                hmatrix=hmatrix,
                partition=partition,
                merge_blocks=merge_blocks,
            )
        else:
            blocks = block_partition(self.input_dim, self.output_dim, eta, min_block_size)
            require_one_block(blocks, self.input_dim, self.output_dim, self.nb_params_share)
            hmatrix = fit_hmat(
                target,
                self.weight_budget,
                eta=blocks.eta,
                min_block_size=min_block_size,
                merge_blocks=merge_blocks,
                max_cost_ratio=max_cost_ratio,
            )
            ranked = hmatrix.partition
        self.partition = ranked
        self.buckets = make_buckets(ranked.leaves)
        self._leaf_operands = (
            leaf_operands(self.buckets, ranked.leaves) if leaf_by_leaf(self.buckets) else None
        )
        # One low-rank block for the whole matrix (what the fit keeps for most trained layers):
        # the two products of plain low rank, nothing else.
        self._one_block = ranked.leaves[0].rank if _is_one_block(ranked) else 0
        factors = (
            hmatrix.factors if hmatrix is not None else _random_factors(ranked, self.input_dim)
        )
        self._build_parameters(factors)

    def layout_sizes(self) -> dict[str, object]:
        """``{"partition": ...}``: the blocks with every leaf's kind and rank (see
        :mod:`structurednets_hmat.layout`); the buckets and index buffers follow from it."""
        return {"partition": partition_to_json(self.partition)}

    @classmethod
    def layout_cost(cls, layout: Layout, batch_size: int) -> Cost:
        """Multiply-adds of the products the kernels run (see :mod:`structurednets_hmat.cost`):
        leaf by leaf for few leaves, ``batch * rank * (rows + cols)`` per low-rank leaf and
        ``batch * rows * cols`` per dense one; else bucket by bucket, padding included.
        The backward (input and factor gradients) is twice the forward."""
        return partition_cost(partition_from_json(layout.sizes["partition"]), batch_size)

    # -- parameters -------------------------------------------------------------------------

    def _build_parameters(self, factors: tuple[tuple[torch.Tensor, ...], ...]) -> None:
        """One parameter per dense bucket (``(G, r, c)``), two flat ones per low-rank bucket:
        the entries of its stacked factors ``Lrow`` and ``Rcol`` that are not padding."""
        dtype = torch.get_default_dtype()
        self.left_factors = nn.ParameterList()
        self.right_factors = nn.ParameterList()
        self.dense_blocks = nn.ParameterList()
        for number, bucket in enumerate(self.buckets):
            if bucket.dense:
                blocks = torch.stack([factors[i][0] for i in bucket.leaves])
                self.dense_blocks.append(nn.Parameter(blocks.to(dtype)))
            else:
                left, right = bucket.stack(factors)
                left_mask, right_mask = bucket.left_mask(), bucket.right_mask()
                self.left_factors.append(nn.Parameter(left[left_mask].to(dtype)))
                self.right_factors.append(nn.Parameter(right[right_mask].to(dtype)))
                if bucket.padded:
                    self.register_buffer(f"_left_mask_{number}", left_mask, persistent=False)
                    self.register_buffer(f"_right_mask_{number}", right_mask, persistent=False)
                self.register_buffer(f"_gather_{number}", bucket.gather_index(), persistent=False)
            for side, blocks in (("rows", bucket.rows), ("cols", bucket.cols)):
                if not blocks.strided:
                    self.register_buffer(f"_{side}_{number}", blocks.index(), persistent=False)

    def _stacked_factors(self) -> list[torch.Tensor]:
        """Per bucket, ``D`` of shape (G, r, c), or the stacked ``Lrow`` and ``Rcol``."""
        stacked = []
        low_rank = dense = 0
        for number, bucket in enumerate(self.buckets):
            if bucket.dense:
                stacked.append(self.dense_blocks[dense])
                dense += 1
                continue
            left, right = self.left_factors[low_rank], self.right_factors[low_rank]
            low_rank += 1
            if bucket.padded:
                left_mask = getattr(self, f"_left_mask_{number}")
                right_mask = getattr(self, f"_right_mask_{number}")
                left = left.new_zeros(bucket.left_shape).masked_scatter(left_mask, left)
                right = right.new_zeros(bucket.right_shape).masked_scatter(right_mask, right)
                stacked += [left, right]
            else:
                stacked += [left.view(bucket.left_shape), right.view(bucket.right_shape)]
        return stacked

    def _operands(self) -> list[DenseOperands | LowRankOperands]:
        operands: list[DenseOperands | LowRankOperands] = []
        for number, bucket in enumerate(self.buckets):
            rows = None if bucket.rows.strided else getattr(self, f"_rows_{number}")
            cols = None if bucket.cols.strided else getattr(self, f"_cols_{number}")
            if bucket.dense:
                operands.append(DenseOperands(bucket, rows, cols))
            else:
                gather = getattr(self, f"_gather_{number}")
                operands.append(LowRankOperands(bucket, rows, cols, gather))
        return operands

    # -- the layer --------------------------------------------------------------------------

    def multiply(self, U: torch.Tensor) -> torch.Tensor:
        if self._one_block:
            rank = self._one_block
            right = self.right_factors[0].view(rank, self.input_dim)
            return (U @ right.T) @ self.left_factors[0].view(self.output_dim, rank).T
        factors = self._stacked_factors()
        if not factors:  # every leaf at rank 0
            return U.new_zeros(U.shape[0], self.output_dim)
        if self._leaf_operands is not None:
            return multiply_leaves(self._leaf_operands, self.output_dim, U, factors)
        Yt = multiply_buckets(self._operands(), self.output_dim, U.t(), factors)
        return Yt.t()

    def to_dense(self) -> torch.Tensor:
        reference = self._reference_parameter()
        device = reference.device
        matrix = reference.new_zeros(self.output_dim, self.input_dim)
        leaves = self.partition.leaves
        factors = iter(self._stacked_factors())
        for bucket in self.buckets:
            if bucket.dense:
                blocks = next(factors)
            else:
                Lrow, Rcol = next(factors), next(factors)
                Lrow = Lrow.view(bucket.rows.count, bucket.rows.size, bucket.row_slots, bucket.rank)
                Rcol = Rcol.view(bucket.cols.count, bucket.col_slots, bucket.rank, bucket.cols.size)
                index = partial(torch.tensor, device=device)
                left = Lrow[index(bucket.row_of), :, index(bucket.row_slot)]  # (G, r, k)
                right = Rcol[index(bucket.col_of), index(bucket.col_slot)]  # (G, k, c)
                blocks = torch.bmm(left, right)
            row_starts = torch.tensor([leaves[i].row_start for i in bucket.leaves], device=device)
            col_starts = torch.tensor([leaves[i].col_start for i in bucket.leaves], device=device)
            rows = row_starts[:, None, None] + torch.arange(bucket.shape[0], device=device)[:, None]
            cols = col_starts[:, None, None] + torch.arange(bucket.shape[1], device=device)
            matrix = matrix.index_put((rows, cols), blocks)
        return matrix

    def to_hmatrix(self) -> HMatrix:
        """The current weights as an :class:`~structurednets_hmat.HMatrix` (float64 copies)."""
        leaves = self.partition.leaves
        factors: list[tuple[torch.Tensor, ...]] = [
            (torch.zeros(leaf.nb_rows, 0), torch.zeros(0, leaf.nb_cols)) for leaf in leaves
        ]
        stacked = iter(self._stacked_factors())
        for bucket in self.buckets:
            if bucket.dense:
                blocks = next(stacked).detach().to("cpu", torch.float64)
                for position, index in enumerate(bucket.leaves):
                    factors[index] = (blocks[position].clone(),)
                continue
            left = next(stacked).detach().to("cpu", torch.float64)
            right = next(stacked).detach().to("cpu", torch.float64)
            for index, pair in zip(bucket.leaves, bucket.unstack(left, right), strict=True):
                factors[index] = tuple(factor.clone() for factor in pair)
        return HMatrix(self.partition, tuple(factors))

    def extra_repr(self) -> str:
        partition = self.partition
        return (
            f"{super().extra_repr()}, eta={partition.eta:g}, "
            f"min_block_size={partition.min_block_size}, leaves={len(partition.leaves)}, "
            f"buckets={len(self.buckets)}"
        )


def _is_one_block(partition: HMatrixPartition) -> bool:
    """Whether the partition is the whole matrix as one low-rank leaf of rank >= 1."""
    leaf = partition.leaves[0]
    return len(partition.leaves) == 1 and not leaf.dense and leaf.rank > 0


def _random_factors(
    partition: HMatrixPartition, input_dim: int
) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Random leaves whose entries have ``nn.Linear``'s standard deviation (float64).

    Dense leaves are uniform like ``nn.Linear``'s weights; a rank-``k`` leaf has normal
    factors of deviation ``s`` with ``k * s**4 = std**2``.
    """
    std = dense_init_std(input_dim)
    factors: list[tuple[torch.Tensor, ...]] = []
    for leaf in partition.leaves:
        rows, cols = leaf.shape
        if leaf.dense:
            bound = std * math.sqrt(3.0)
            block = torch.empty(rows, cols, dtype=torch.float64).uniform_(-bound, bound)
            factors.append((block,))
        elif leaf.rank == 0:
            factors.append((torch.zeros(rows, 0), torch.zeros(0, cols)))
        else:
            scale = (std**2 / leaf.rank) ** 0.25
            left = torch.randn(rows, leaf.rank, dtype=torch.float64) * scale
            right = torch.randn(leaf.rank, cols, dtype=torch.float64) * scale
            factors.append((left, right))
    return tuple(factors)
