"""Projections onto sparse supports: keep the largest entries (or blocks), normalise."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["largest_entries_mask", "project"]


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest entry (1-based) of each row of ``values`` (2-D), keeping the
    dimension: ``values.kthvalue(k, dim=-1, keepdim=True).values``.

    On the CPU numpy's introselect finds the same value about 10x faster than ``kthvalue``
    (147456 float64 entries: 0.14 ms against 1.3 ms), which took a quarter of a fit's time.
    """
    if values.device.type != "cpu" or values.requires_grad:
        return values.kthvalue(k, dim=-1, keepdim=True).values
    chosen = np.partition(values.numpy(), k - 1, axis=-1)[..., k - 1 : k]
    return torch.from_numpy(np.ascontiguousarray(chosen))


def largest_entries_mask(
    magnitudes: torch.Tensor, k: int, priority: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of each row of ``magnitudes`` (2-D).

    Ties at the threshold go to the lower index, or, for a single row with a ``priority``
    of the same shape (distinct values), to the higher priority. Either way the result does
    not depend on the sort algorithm.
    """
    count = magnitudes.shape[-1]
    if k >= count:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    threshold = _kth_smallest(magnitudes, count - k + 1)
    above = magnitudes > threshold
    tied = magnitudes == threshold
    room = k - above.sum(-1, keepdim=True)
    if priority is None or magnitudes.shape[0] != 1:
        return above | (tied & (tied.cumsum(-1) <= room))
    ranked = torch.where(tied, priority, torch.full_like(priority, -1.0))
    cut = _kth_smallest(ranked, count - int(room) + 1)
    return above | (tied & (ranked >= cut))


def _select(magnitudes: torch.Tensor, k: int, kind: str, priority: torch.Tensor | None):
    rows, cols = magnitudes.shape
    if k >= rows * cols:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if kind == "global":
        flat_priority = None if priority is None else priority.reshape(1, -1)
        support = largest_entries_mask(magnitudes.reshape(1, -1), k, flat_priority)
        return support.reshape(rows, cols)
    if kind == "rowcol":
        support = largest_entries_mask(magnitudes, max(1, k // rows))
        return support | largest_entries_mask(magnitudes.T, max(1, k // cols)).T
    raise ValueError(f"projection must be 'global' or 'rowcol', got {kind!r}")


def project(
    matrix: torch.Tensor,
    k: int,
    kind: str = "global",
    priority: torch.Tensor | None = None,
    block: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the largest entries of ``matrix`` and normalise to Frobenius norm 1.

    ``"global"`` keeps the ``k`` largest entries, ties going to the higher ``priority``
    (same shape as ``matrix``) if given, else to the lower index; ``"rowcol"`` keeps the
    union of the ``k // rows`` largest of each row and the ``k // cols`` largest of each
    column (ties to the lower index), which can exceed ``k`` (up to twice) while the
    supports settle (see :class:`Strategy`). With ``block > 1`` the same is done on the
    ``block x block`` blocks, ranked by their Frobenius norms (``k // block**2`` blocks;
    ``priority`` then has the shape of the block grid). Returns the projected matrix and the
    support.
    """
    rows, cols = matrix.shape
    if block == 1:
        support = _select(matrix.abs(), k, kind, priority)
    else:
        norms = matrix.reshape(rows // block, block, cols // block, block).square().sum((1, 3))
        chosen = _select(norms, k // (block * block), kind, priority)
        support = chosen.repeat_interleave(block, 0).repeat_interleave(block, 1)
    projected = matrix * support
    norm = torch.linalg.norm(projected)
    if norm > 0:
        projected /= norm
    return projected, support
