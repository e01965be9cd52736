"""Sparse kernels of the PSM layer.

``csr_matmul`` multiplies a sparse factor, given by its CSR index buffers and its dense
``values``, with a dense matrix. On the CPU the product is a weighted bag sum
(``embedding_bag``); on other devices a ``torch.sparse`` CSR product. Its backward does not go
through autograd of sparse tensors (which would make the values' gradient a sparse tensor and
turn the factor dense): the input gradient is the transposed factor times the output
gradient, and the values' gradient is the output gradient times the input, sampled on the
support only (an SDDMM, ``torch.sparse.sampled_addmm``). In eager mode
:func:`sparse_matmul` runs these through a ``torch.autograd.Function``; under
``torch.compile`` through torch custom operators, which the compiler treats as opaque calls on
ordinary dense tensors.

The sparse CSR kernels exist in float32 and float64 only (MKL on the CPU; on CUDA the sampled
product has no reduced-precision version either): in float16 and bfloat16 all products run
in float32 on operands cast from the reduced dtype and are rounded back to it, so that the
result has the dtype of the operands, as ``nn.Linear`` would give.
"""

from __future__ import annotations

import warnings

import torch

from structurednets.precision import REDUCED_DTYPES, autocast_off, warn_slow_fallback

__all__ = ["csr_matmul", "csr_matmul_no_grad", "sampled_product", "sparse_matmul"]


def _csr(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]):
    # torch warns that CSR support is in beta; these kernels use only its stable parts
    # (CSR times dense, sampled_addmm), so the warning would only confuse users.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


_CUDA_FALLBACK = (
    "on CUDA its element-sparse factors multiply with cuSPARSE CSR kernels (in float32 for "
    "float16 and bfloat16), usually much slower than a cuBLAS nn.Linear of the same shape; "
    "block-sparse factors (block_size > 1) use batched dense products instead"
)


def _spmm(values, crow, col, dense, nb_rows: int) -> torch.Tensor:
    if dense.device.type == "cuda":
        warn_slow_fallback("psm", _CUDA_FALLBACK)
    if dense.dtype in REDUCED_DTYPES:
        return _spmm(values.float(), crow, col, dense.float(), nb_rows).to(dense.dtype)
    with autocast_off(dense.device.type):  # a backward pass may run under autocast
        return _spmm_in_dtype(values, crow, col, dense, nb_rows)


def _spmm_in_dtype(values, crow, col, dense, nb_rows: int) -> torch.Tensor:
    if dense.device.type == "cpu":
        return _spmm_cpu(values, crow, col, dense)
    return torch.mm(_csr(values, crow, col, (nb_rows, dense.shape[0])), dense)


def _spmm_cpu(values, crow, col, dense) -> torch.Tensor:
    """``S @ dense`` on the CPU as a weighted bag sum: row ``r`` of the result is the sum of
    ``values[k] * dense[col[k]]`` over the row's entries ``k``.

    ``embedding_bag`` runs this with contiguous rows of ``dense`` (one run of ``batch`` values
    per stored entry) in FBGEMM's vectorised kernels: 384 x 384 factor with 24576 values,
    256 columns, one thread: 0.15 ms, against 0.48 ms for MKL's CSR product.
    """
    if col.numel() == 0:
        return dense.new_zeros((crow.numel() - 1, dense.shape[1]))
    return torch.nn.functional.embedding_bag(
        col,
        dense.contiguous(),
        crow,
        mode="sum",
        per_sample_weights=values,
        include_last_offset=True,
    )


@torch.library.custom_op("structurednets_psm::csr_matmul_no_grad", mutates_args=())
def csr_matmul_no_grad(
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    dense: torch.Tensor,
    nb_rows: int,
) -> torch.Tensor:
    """``S @ dense`` for the CSR matrix ``S`` (nb_rows x dense.shape[0]); no autograd."""
    return _spmm(values, crow_indices, col_indices, dense, nb_rows)


@csr_matmul_no_grad.register_fake
def _(values, crow_indices, col_indices, dense, nb_rows):
    return dense.new_empty((nb_rows, dense.shape[1]))


def _sampled(crow_indices, col_indices, left, right) -> torch.Tensor:
    dtype = left.dtype
    if dtype in REDUCED_DTYPES:
        left, right = left.float(), right.float()
    nb_values = col_indices.shape[0]
    pattern = _csr(
        left.new_zeros(nb_values), crow_indices, col_indices, (left.shape[0], right.shape[0])
    )
    with autocast_off(left.device.type):  # a backward pass may run under autocast
        product = torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0)
    return product.values().to(dtype)


@torch.library.custom_op("structurednets_psm::sampled_product", mutates_args=())
def sampled_product(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
) -> torch.Tensor:
    """``(left @ right.T)[r, c]`` for each stored entry ``(r, c)`` of the CSR pattern, in CSR
    order; ``left`` is (rows x batch), ``right`` is (cols x batch)."""
    return _sampled(crow_indices, col_indices, left, right).clone()


@sampled_product.register_fake
def _(crow_indices, col_indices, left, right):
    return left.new_empty((col_indices.shape[0],))


@torch.library.custom_op("structurednets_psm::csr_matmul", mutates_args=())
def csr_matmul(
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    transpose_perm: torch.Tensor,
    transpose_crow_indices: torch.Tensor,
    transpose_col_indices: torch.Tensor,
    dense: torch.Tensor,
    nb_rows: int,
) -> torch.Tensor:
    """``S @ dense`` for the CSR matrix ``S`` (nb_rows x dense.shape[0]), differentiable in
    ``values`` and ``dense``.

    ``transpose_*`` describe ``S.T`` in CSR form: its values are ``values[transpose_perm]``.
    """
    return _spmm(values, crow_indices, col_indices, dense, nb_rows)


@csr_matmul.register_fake
def _(
    values, crow_indices, col_indices, transpose_perm, transpose_crow, transpose_col, dense, nb_rows
):
    return dense.new_empty((nb_rows, dense.shape[1]))


def _setup_context(ctx, inputs, output):
    values, crow, col, perm, transpose_crow, transpose_col, dense, _ = inputs
    ctx.save_for_backward(values, crow, col, perm, transpose_crow, transpose_col, dense)


def _backward(ctx, grad_output):
    values, crow, col, perm, transpose_crow, transpose_col, dense = ctx.saved_tensors
    grad_output = grad_output.contiguous()
    grad_values = grad_dense = None
    if ctx.needs_input_grad[0]:
        grad_values = sampled_product(crow, col, grad_output, dense)
    if ctx.needs_input_grad[6]:
        grad_dense = csr_matmul_no_grad(
            values.index_select(0, perm), transpose_crow, transpose_col, grad_output, dense.shape[0]
        )
    return grad_values, None, None, None, None, None, grad_dense, None


csr_matmul.register_autograd(_backward, setup_context=_setup_context)


class _EagerCsrMatmul(torch.autograd.Function):
    """:func:`csr_matmul` outside ``torch.compile``: the same products, called directly.

    The custom operator's dispatch and autograd wrappers cost about 0.1 ms per factor and
    step in eager mode, as much as a factor's whole product at the sizes of a fitted
    384-wide layer; compiled graphs keep the opaque custom operator.
    """

    @staticmethod
    def forward(ctx, values, crow, col, perm, transpose_crow, transpose_col, dense, nb_rows):
        ctx.save_for_backward(values, crow, col, perm, transpose_crow, transpose_col, dense)
        return _spmm(values, crow, col, dense, nb_rows)

    @staticmethod
    def backward(ctx, grad_output):
        values, crow, col, perm, transpose_crow, transpose_col, dense = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_values = grad_dense = None
        if ctx.needs_input_grad[0]:
            grad_values = _sampled(crow, col, grad_output, dense)
        if ctx.needs_input_grad[6]:
            transposed = values.index_select(0, perm)
            grad_dense = _spmm(
                transposed, transpose_crow, transpose_col, grad_output, dense.shape[0]
            )
        return grad_values, None, None, None, None, None, grad_dense, None


def sparse_matmul(
    values, crow_indices, col_indices, transpose_perm, transpose_crow, transpose_col, dense, nb_rows
) -> torch.Tensor:
    """:func:`csr_matmul`, through the custom operator only while ``torch.compile`` traces."""
    arguments = (
        values,
        crow_indices,
        col_indices,
        transpose_perm,
        transpose_crow,
        transpose_col,
        dense,
    )
    if torch.compiler.is_compiling():
        return csr_matmul(*arguments, nb_rows)
    return _EagerCsrMatmul.apply(*arguments, nb_rows)
