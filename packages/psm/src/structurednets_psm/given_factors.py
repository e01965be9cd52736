"""Factors given by the user (``factors=``): scipy sparse matrices, torch sparse tensors or
``(indices, values)`` pairs, read into coordinates and checked to chain and fit the budget."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse
import torch

from structurednets_psm.layout import (
    FactorSizes,
    factor_shapes,
    require_nonzeros_within_budget,
)

__all__ = ["as_coordinates", "check_factors_alone", "sizes_of_factors"]


def sizes_of_factors(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    factors: object,
    inner_dim: int | None,
) -> tuple[FactorSizes, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The sizes of user-given factors ``S_1, ..., S_J`` and their ``(rows, cols, values)``
    coordinates (checked to chain and to fit the budget)."""
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or not factors:
        raise TypeError(
            "factors must be a non-empty list of sparse factors S_1, ..., S_J (W = S_1 ... S_J; "
            f"scipy sparse matrices, torch sparse tensors or (indices, values) pairs), got {factors!r}"
        )
    expected = factor_shapes(input_dim, output_dim, len(factors), inner_dim)
    shapes, coordinates = [], []
    previous_cols = output_dim
    for j, factor in enumerate(factors):
        is_pair = isinstance(factor, (tuple, list))
        shape, rows, cols, values = as_coordinates(
            f"factors[{j}]", factor, expected[j] if is_pair else None
        )
        if shape[0] != previous_cols:
            raise ValueError(
                f"factors[{j}] must have {previous_cols} rows to chain "
                f"(W = S_1 ... S_J is output_dim x input_dim), got shape {shape}"
            )
        previous_cols = shape[1]
        shapes.append(shape)
        coordinates.append((rows, cols, values))
    if previous_cols != input_dim:
        raise ValueError(
            f"factors[-1] must have input_dim={input_dim} columns, got shape {shapes[-1]}"
        )
    nonzeros = tuple(rows.numel() for rows, _, _ in coordinates)
    require_nonzeros_within_budget(
        input_dim, output_dim, nb_params_share, nonzeros, "the given factors"
    )
    return FactorSizes(tuple(shapes), nonzeros), coordinates


def check_factors_alone(factors: object, **options: object) -> None:
    """Refuse the size options that given ``factors`` already decide (``block_size`` must be 1:
    given factors are element-sparse; ``nb_matrices``, if given, their number)."""
    nb_matrices = options.pop("nb_matrices", None)
    count = len(factors) if isinstance(factors, Sequence) else None
    if nb_matrices is not None and nb_matrices != count:
        raise ValueError(
            f"nb_matrices={nb_matrices!r} does not match the {count} given factors; "
            "drop nb_matrices"
        )
    if options.get("block_size", 1) != 1:
        raise ValueError(
            f"block_size={options['block_size']!r} cannot be combined with factors (given "
            "factors are element-sparse); leave block_size=1"
        )
    for name, value in options.items():
        if name != "block_size" and value is not None:
            raise ValueError(
                f"{name}={value!r} cannot be combined with factors (the given factors fix "
                f"the number of factors, their shapes and their nonzeros); drop {name}"
            )


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
