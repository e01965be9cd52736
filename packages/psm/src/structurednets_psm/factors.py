"""One sparse factor of a PSM layer: a fixed support (index buffers) and its dense values."""

from __future__ import annotations

import scipy.sparse
import torch
from torch import nn

from structurednets_psm.kernels import sparse_matmul

__all__ = ["BlockSparseFactor", "SparseFactor", "random_support"]


class SparseFactor(nn.Module):
    """A ``rows x cols`` sparse matrix with a fixed support, stored in CSR order.

    The values are one dense ``nn.Parameter`` (so every optimiser, ``state_dict``, DDP and
    ``torch.compile`` see an ordinary tensor); the support and its transpose are integer
    buffers, saved in the ``state_dict`` with the values.

    Args:
        rows, cols: the shape.
        row_indices, col_indices: ``(nnz,)`` integer tensors, the support (no duplicates).
        values: ``(nnz,)`` values at those positions; converted to the default dtype.

    Attributes:
        values: ``(nnz,)`` parameter, in row-major (CSR) order of the support.
        crow_indices, col_indices: the CSR structure, ``(rows + 1,)`` and ``(nnz,)``.
        transpose_perm, transpose_crow_indices, transpose_col_indices: the CSR structure of
            the transposed factor, whose values are ``values[transpose_perm]``.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        row_indices: torch.Tensor,
        col_indices: torch.Tensor,
        values: torch.Tensor,
    ):
        super().__init__()
        self.rows, self.cols = int(rows), int(cols)
        row_indices = row_indices.to(torch.int64).cpu()
        col_indices = col_indices.to(torch.int64).cpu()
        order = torch.argsort(row_indices * self.cols + col_indices)
        row_indices, col_indices = row_indices[order], col_indices[order]
        values = values.detach().cpu()[order]
        transpose_perm = torch.argsort(col_indices * self.rows + row_indices)
        self.register_buffer("crow_indices", _compressed(row_indices, self.rows))
        self.register_buffer("col_indices", col_indices)
        self.register_buffer("transpose_perm", transpose_perm)
        self.register_buffer("transpose_crow_indices", _compressed(col_indices, self.cols))
        self.register_buffer("transpose_col_indices", row_indices[transpose_perm])
        self.values = nn.Parameter(values.to(torch.get_default_dtype()))

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def row_indices(self) -> torch.Tensor:
        """``(nnz,)`` row of each stored value."""
        counts = self.crow_indices.diff()
        rows = torch.arange(self.rows, device=counts.device)
        return torch.repeat_interleave(rows, counts, output_size=self.col_indices.numel())

    def matmul(self, dense: torch.Tensor) -> torch.Tensor:
        """``S @ dense`` for ``dense`` of shape ``(cols, batch)``; differentiable."""
        return sparse_matmul(
            self.values,
            self.crow_indices,
            self.col_indices,
            self.transpose_perm,
            self.transpose_crow_indices,
            self.transpose_col_indices,
            dense,
            self.rows,
        )

    def to_dense(self) -> torch.Tensor:
        """The factor as a dense ``(rows, cols)`` tensor; differentiable in the values."""
        dense = self.values.new_zeros(self.rows, self.cols)
        return dense.index_put((self.row_indices(), self.col_indices), self.values)

    def to_scipy(self) -> scipy.sparse.csr_matrix:
        """The factor as a scipy CSR matrix (float64 copy)."""
        return scipy.sparse.csr_matrix(
            (
                self.values.detach().cpu().double().numpy(),
                self.col_indices.cpu().numpy(),
                self.crow_indices.cpu().numpy(),
            ),
            shape=(self.rows, self.cols),
        )

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, nnz={self.nnz}"


class BlockSparseFactor(nn.Module):
    """A ``rows x cols`` matrix whose support is a fixed set of dense ``b x b`` blocks.

    The products run as batched dense matrix products on the blocks: gather the input's
    block rows, ``torch.bmm`` with the blocks, add into the output's block rows. These are
    ordinary differentiable torch operations, whose backward is again a gather, a ``bmm``
    (values' gradient: output gradient times input, block by block) and a scatter-add.

    Args:
        rows, cols: the shape, multiples of ``block_size``.
        block_size: ``b``.
        block_rows, block_cols: ``(nblocks,)`` block coordinates (no duplicates).
        values: ``(nblocks, b, b)`` dense blocks; converted to the default dtype.

    Attributes:
        values: ``(nblocks, b, b)`` parameter, blocks sorted by block row, then column.
        block_rows, block_cols: integer buffers, the block coordinates.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        block_size: int,
        block_rows: torch.Tensor,
        block_cols: torch.Tensor,
        values: torch.Tensor,
    ):
        super().__init__()
        self.rows, self.cols, self.block_size = int(rows), int(cols), int(block_size)
        block_rows = block_rows.to(torch.int64).cpu()
        block_cols = block_cols.to(torch.int64).cpu()
        order = torch.argsort(block_rows * (self.cols // self.block_size) + block_cols)
        self.register_buffer("block_rows", block_rows[order])
        self.register_buffer("block_cols", block_cols[order])
        values = values.detach().cpu()[order]
        self.values = nn.Parameter(values.to(torch.get_default_dtype()))

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def matmul(self, dense: torch.Tensor) -> torch.Tensor:
        """``S @ dense`` for ``dense`` of shape ``(cols, batch)``; differentiable."""
        b, batch = self.block_size, dense.shape[1]
        # a transposed input would make the gathered blocks strided, and bmm slow
        dense = dense.contiguous()
        blocks = dense.reshape(self.cols // b, b, batch).index_select(0, self.block_cols)
        products = torch.bmm(self.values, blocks)
        result = products.new_zeros(self.rows // b, b, batch)
        return result.index_add(0, self.block_rows, products).reshape(self.rows, batch)

    def to_dense(self) -> torch.Tensor:
        """The factor as a dense ``(rows, cols)`` tensor; differentiable in the values."""
        b = self.block_size
        grid = self.values.new_zeros(self.rows // b, self.cols // b, b, b)
        grid = grid.index_put((self.block_rows, self.block_cols), self.values)
        return grid.permute(0, 2, 1, 3).reshape(self.rows, self.cols)

    def to_scipy(self) -> scipy.sparse.csr_matrix:
        """The factor as a scipy CSR matrix (float64 copy)."""
        b = self.block_size
        counts = torch.bincount(self.block_rows, minlength=self.rows // b)
        indptr = torch.zeros(self.rows // b + 1, dtype=torch.int64)
        indptr[1:] = counts.cumsum(0)
        bsr = scipy.sparse.bsr_matrix(
            (
                self.values.detach().cpu().double().numpy(),
                self.block_cols.cpu().numpy(),
                indptr.numpy(),
            ),
            shape=(self.rows, self.cols),
        )
        return bsr.tocsr()

    def extra_repr(self) -> str:
        return (
            f"rows={self.rows}, cols={self.cols}, block_size={self.block_size}, "
            f"blocks={self.values.shape[0]}, nnz={self.nnz}"
        )


def _compressed(sorted_indices: torch.Tensor, length: int) -> torch.Tensor:
    crow = torch.zeros(length + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(sorted_indices, minlength=length).cumsum(0)
    return crow


def random_support(
    rows: int, cols: int, nnz: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``nnz`` distinct random positions of a ``rows x cols`` matrix (``0 <= nnz <= rows *
    cols``) that touch every row and every column when ``nnz >= max(rows, cols)``.

    ``max(rows, cols)`` positions form a random cover (a permutation matrix when square);
    the others are drawn uniformly from the remaining positions. Fewer than
    ``max(rows, cols)`` positions are part of such a cover (in distinct rows or columns,
    whichever are more). Returns ``(row_indices, col_indices)``, int64, unsorted.
    """
    size = rows * cols
    cover = max(rows, cols)
    if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= size:
        raise ValueError(
            f"nnz must be an integer between 0 and {size} (a {rows}x{cols} support), got {nnz!r}"
        )
    steps = torch.arange(cover)
    row_perm = torch.randperm(rows, generator=generator)
    col_perm = torch.randperm(cols, generator=generator)
    covered = row_perm[steps % rows] * cols + col_perm[steps % cols]
    needed = nnz - cover
    if needed <= 0:
        chosen = covered[:nnz]
    elif needed > (size - cover) // 4:
        taken = torch.zeros(size, dtype=torch.bool)
        taken[covered] = True
        free = (~taken).nonzero().squeeze(1)
        extra = free[torch.randperm(free.numel(), generator=generator)[:needed]]
        chosen = torch.cat([covered, extra])
    else:
        taken = torch.zeros(size, dtype=torch.bool)
        taken[covered] = True
        extra = torch.empty(0, dtype=torch.int64)
        while extra.numel() < needed:
            draws = torch.randint(size, (2 * (needed - extra.numel()) + 16,), generator=generator)
            draws = draws[~taken[draws]]
            # keep the first occurrence of each draw, in drawing order
            unique, inverse = torch.unique(draws, return_inverse=True)
            first = torch.full((unique.numel(),), draws.numel(), dtype=torch.int64)
            first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
            draws = draws[first.sort().values]
            draws = draws[: needed - extra.numel()]
            taken[draws] = True
            extra = torch.cat([extra, draws])
        chosen = torch.cat([covered, extra])
    return chosen // cols, chosen % cols
