"""One sparse factor of a PSM layer: a fixed support (index buffers) and its dense values."""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
from torch import nn

from structurednets_psm.kernels import csr_matmul

__all__ = ["BlockSparseFactor", "SparseFactor", "as_coordinates", "random_support"]


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
        return csr_matmul(
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


def as_coordinates(
    name: str, factor: object, shape: tuple[int, int] | None
) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A user-given factor as ``(shape, rows, cols, values)`` (float64 values, no duplicates).

    Accepts a scipy sparse matrix or array, a torch sparse tensor (any sparse layout), or a
    pair ``(indices, values)`` with ``indices`` of shape ``(2, nnz)`` (row, col); a pair takes
    ``shape`` as its shape. Duplicate positions are summed.
    """
    if scipy.sparse.issparse(factor):
        coo = scipy.sparse.coo_matrix(factor)
        coo.sum_duplicates()
        given_shape = coo.shape
        rows = torch.from_numpy(coo.row.astype(np.int64))
        cols = torch.from_numpy(coo.col.astype(np.int64))
        values = _real_values(name, coo.data)
    elif isinstance(factor, torch.Tensor) and factor.layout != torch.strided:
        if factor.dim() != 2:
            raise ValueError(f"{name} must be a 2-D sparse tensor, got {factor.dim()} dimensions")
        coo = factor.detach().cpu().to_sparse_coo().coalesce()
        given_shape = tuple(coo.shape)
        rows, cols = coo.indices()
        values = _real_values(name, coo.values())
    elif isinstance(factor, (tuple, list)) and len(factor) == 2:
        if shape is None:
            raise ValueError(f"{name}: an (indices, values) pair needs a known shape")
        indices = factor[0]
        indices = indices.detach().cpu() if isinstance(indices, torch.Tensor) else indices
        indices = torch.as_tensor(np.asarray(indices))
        if indices.dim() != 2 or indices.shape[0] != 2 or indices.is_floating_point():
            raise ValueError(
                f"{name}: indices must be an integer array of shape (2, nnz), "
                f"got {indices.dtype} of shape {tuple(indices.shape)}"
            )
        values = _real_values(name, factor[1])
        if values.shape != (indices.shape[1],):
            raise ValueError(
                f"{name}: values must have shape ({indices.shape[1]},) to match the indices, "
                f"got {tuple(values.shape)}"
            )
        given_shape = shape
        rows, cols = indices.to(torch.int64)
        _check_range(name, rows, cols, given_shape)
        coo = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), values, shape, check_invariants=True
        ).coalesce()
        rows, cols = coo.indices()
        values = coo.values()
    else:
        raise TypeError(
            f"{name} must be a scipy sparse matrix, a torch sparse tensor or a pair "
            f"(indices of shape (2, nnz), values of shape (nnz,)), got {type(factor).__name__}"
        )
    if shape is not None and tuple(given_shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(given_shape)}")
    _check_range(name, rows, cols, given_shape)
    shape = (int(given_shape[0]), int(given_shape[1]))
    return shape, rows.to(torch.int64), cols.to(torch.int64), values


def _check_range(name: str, rows: torch.Tensor, cols: torch.Tensor, shape) -> None:
    if rows.numel() and (
        rows.min() < 0 or cols.min() < 0 or rows.max() >= shape[0] or cols.max() >= shape[1]
    ):
        raise ValueError(f"{name} has indices outside its shape {tuple(shape)}")


def _real_values(name: str, values: object) -> torch.Tensor:
    """``values`` as a float64 CPU tensor; real and finite, else TypeError/ValueError."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach().cpu()
    else:
        tensor = torch.as_tensor(np.asarray(values))
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    tensor = tensor.to(torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite, but some of its values are NaN or infinite")
    return tensor
