"""Periodic three-band stencils and banded dot products: the steps of the LDR kernels.

A tridiagonal-plus-corner matrix ``M`` (bands ``(3, n)``, see :mod:`structurednets_ldr.operators`)
applied to the rows (or columns) of a buffer is five in-place operations on slices of it
(:func:`stencil`); the gradient of ``M`` in ``Y = M R`` is :func:`band_dots`. Slicing is an
operation of its own, so the slices a stencil reads and writes are made once per buffer
(:func:`row_parts`, :func:`column_parts`, :func:`coefficient_parts`, :func:`transposed_parts`).
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "band_dots",
    "coefficient_parts",
    "column_parts",
    "row_parts",
    "stencil",
    "stencil_rows",
    "transposed_parts",
]


def row_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The views ``[1:]``, ``[:1]``, ``[:-1]``, ``[-1:]`` along the first dimension, which a
    periodic three-band stencil on rows reads and writes (made once per buffer, since every
    slicing is an operation of its own)."""
    return tensor[1:], tensor[:1], tensor[:-1], tensor[-1:]


def column_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`row_parts` along the second dimension."""
    return tensor[:, 1:], tensor[:, :1], tensor[:, :-1], tensor[:, -1:]


def coefficient_parts(bands: torch.Tensor, rows: bool) -> tuple[torch.Tensor, ...]:
    """``(centre, minus[1:], minus[:1], plus[:-1], plus[-1:])`` of periodic three-band
    ``bands`` ``(3, n)``, as columns (for :func:`row_parts`) or as rows."""
    minus, centre, plus = (band.unsqueeze(1) for band in bands) if rows else bands
    return centre, minus[1:], minus[:1], plus[:-1], plus[-1:]


def transposed_parts(bands: torch.Tensor, rows: bool = False) -> tuple[torch.Tensor, ...]:
    """:func:`coefficient_parts` of the transpose of ``bands``, without forming its bands
    (``transpose_bands`` is two rolls and a stack)."""
    # the transpose's minus band is plus rolled, and so on
    minus, centre, plus = (band.unsqueeze(1) for band in bands) if rows else bands
    return centre, plus[:-1], plus[-1:], minus[1:], minus[:1]


def stencil(coefficients, source, source_parts, target, target_parts, base=None) -> None:
    """``target = base + stencil(source)`` with the parts made by :func:`coefficient_parts`
    and :func:`row_parts` (rows) or :func:`column_parts` (columns): five operations."""
    centre, minus_tail, minus_head, plus_init, plus_last = coefficients
    source_tail, source_head, source_init, source_last = source_parts
    target_tail, target_head, target_init, target_last = target_parts
    if base is None:
        torch.mul(source, centre, out=target)
    else:
        torch.addcmul(base, source, centre, out=target)
    target_tail.addcmul_(source_init, minus_tail)
    target_head.addcmul_(source_last, minus_head)
    target_init.addcmul_(source_tail, plus_init)
    target_last.addcmul_(source_head, plus_last)


def stencil_rows(coefficients, source, target, base=None) -> None:
    """:func:`stencil` on rows, for buffers whose slices are not reused."""
    stencil(coefficients, source, row_parts(source), target, row_parts(target), base)


@functools.lru_cache(maxsize=64)
def _boundary_indices(n: int, covered: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Rows of :func:`band_dots` outside the chunked interior and their three neighbours."""
    rows = torch.tensor(sorted({0, n - 1, *range(1 + covered, n - 1)}))
    neighbours = (rows[:, None] + torch.tensor([-1, 0, 1])) % n
    return rows.to(device), neighbours.reshape(-1).to(device)


def band_dots(left: torch.Tensor, right: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """``out[o + 1, p] = <left[p], right[(p + o) % n]>`` for ``o = -1, 0, 1``: ``(3, n)``.

    The gradient of a periodic three-band matrix ``M`` in ``Y = M R`` is ``band_dots(dY, R)``.
    Interior rows go in chunks of ``chunk`` rows through one batched product (each chunk
    against its rows and one more on each side), so each input is read about once.
    """
    n, C = left.shape
    out = left.new_zeros(3, n)
    size = min(chunk, n - 2)
    nb_chunks = (n - 2) // size if size > 0 else 0
    if nb_chunks:
        (ls0, ls1), (rs0, rs1) = left.stride(), right.stride()
        chunks_left = left.as_strided(
            (nb_chunks, size, C), (size * ls0, ls0, ls1), left.storage_offset() + ls0
        )
        chunks_right = right.as_strided(
            (nb_chunks, size + 2, C), (size * rs0, rs0, rs1), right.storage_offset()
        )
        products = torch.bmm(chunks_left, chunks_right.transpose(1, 2))
        for band in range(3):
            diagonal = torch.diagonal(products, offset=band, dim1=1, dim2=2)
            out[band, 1 : 1 + nb_chunks * size] = diagonal.reshape(-1)
    rows, neighbours = _boundary_indices(n, nb_chunks * size, left.device)
    boundary_left = left.index_select(0, rows)
    boundary_right = right.index_select(0, neighbours).view(len(rows), 3, C)
    out[:, rows] = torch.einsum("kc,kbc->bk", boundary_left, boundary_right)
    return out
