"""Tridiagonal-plus-corner operators stored as three periodic bands.

An ``n x n`` matrix that is tridiagonal plus the two corner entries ``A[0, n-1]`` and
``A[n-1, 0]`` has exactly ``3 n`` possible nonzeros (``n >= 3``): for every row ``i`` the
entries in the columns ``i - 1``, ``i`` and ``i + 1`` taken modulo ``n``. We store them as
``bands`` of shape ``(3, n)``:

- ``bands[0, i] = A[i, (i - 1) % n]``: the subdiagonal, with the top-right corner ``A[0, n-1]``
  at index 0;
- ``bands[1, i] = A[i, i]``: the diagonal;
- ``bands[2, i] = A[i, (i + 1) % n]``: the superdiagonal, with the bottom-left corner
  ``A[n-1, 0]`` at index ``n - 1``.

In other words ``A = diag(bands[0]) S^-1 + diag(bands[1]) + diag(bands[2]) S`` with ``S`` the
cyclic shift ``(S x)[i] = x[(i + 1) % n]``. For ``n <= 2`` some of these positions coincide and
their bands add up; the sum formula stays the definition.
"""

from __future__ import annotations

import torch

from structurednets.validation import as_matrix

__all__ = [
    "bands_from_dense",
    "bands_to_dense",
    "cyclic_shift_bands",
    "transpose_bands",
]

OFFSETS = (-1, 0, 1)


def bands_to_dense(bands: torch.Tensor) -> torch.Tensor:
    """The ``(n, n)`` matrix of ``bands`` (shape ``(3, n)``); differentiable."""
    n = bands.shape[1]
    rows = torch.arange(n, device=bands.device)
    dense = bands.new_zeros(n, n)
    for band, offset in zip(bands, OFFSETS, strict=True):
        dense = dense.index_put((rows, (rows + offset) % n), band, accumulate=True)
    return dense


def bands_from_dense(name: str, matrix: object, n: int) -> torch.Tensor:
    """Check that ``matrix`` is ``n x n`` tridiagonal plus corners; return its ``(3, n)`` bands.

    Raises ``ValueError`` naming ``name`` if an entry outside that pattern is nonzero.
    Returns a float64 CPU tensor. For ``n <= 2`` an entry reachable from two bands is put in
    the first of (diagonal, superdiagonal, subdiagonal) and the other band gets 0.
    """
    dense = as_matrix(name, matrix, n, n, "n x n, tridiagonal plus the two corner entries")
    rows = torch.arange(n)
    bands = torch.zeros(3, n, dtype=torch.float64)
    taken = torch.zeros(n, n, dtype=torch.bool)
    for band in (1, 2, 0):
        columns = (rows + OFFSETS[band]) % n
        free = ~taken[rows, columns]
        bands[band] = torch.where(free, dense[rows, columns], torch.zeros(()))
        taken[rows, columns] = True
    outside = dense.masked_fill(taken, 0.0)
    if outside.any():
        i, j = (int(v) for v in outside.nonzero()[0])
        raise ValueError(
            f"{name} must be tridiagonal plus the two corner entries [0, n-1] and [n-1, 0], "
            f"but entry [{i}, {j}] is {float(dense[i, j]):g}"
        )
    return bands


def transpose_bands(bands: torch.Tensor) -> torch.Tensor:
    """Bands of the transpose: ``bands_to_dense(transpose_bands(b)) == bands_to_dense(b).T``."""
    return torch.stack(
        (bands[2].roll(1, 0), bands[1], bands[0].roll(-1, 0)),
    )


def cyclic_shift_bands(
    n: int, corner: float = 1.0, *, down: bool = True, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Bands of the ``f``-cyclic shift ``Z_f`` (``down=True``) or its transpose.

    ``Z_f`` has ones on the subdiagonal and ``f = corner`` in the top-right corner, so
    ``(Z_f x) = (f x[n-1], x[0], ..., x[n-2])``. With ``corner=0`` it is the nilpotent
    down-shift; ``Z_1`` is orthogonal, so its powers stay bounded.
    """
    bands = torch.zeros(3, n, dtype=dtype or torch.get_default_dtype())
    bands[0] = 1.0
    bands[0, 0] = corner
    return bands if down else transpose_bands(bands)
