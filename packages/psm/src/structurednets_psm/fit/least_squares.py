"""Exact least squares on fixed supports, and filling supports left short of their size."""

from __future__ import annotations

import torch

from structurednets.plugin import relative_error
from structurednets_psm.fit.palm import DTYPE, PALMState, chain_product, identity
from structurednets_psm.fit.projections import largest_entries_mask

__all__ = ["fill_supports", "polish"]


def rows_least_squares(
    target: torch.Tensor, right: torch.Tensor, support: torch.Tensor, max_row_nonzeros: int = 256
) -> torch.Tensor | None:
    """``S`` with the given support minimising ``||target - S @ right||_F`` (rows are
    independent), or ``None`` when a row has more than ``max_row_nonzeros`` entries.

    Rows are solved in groups of similar counts (sorted, ``_GROUP_ROWS`` at a time), each
    group's systems padded to its own widest row only: on a fitted 1536 x 384 factor (2 to
    170 entries per row) padding every row to the widest made these solves most of the fit.
    """
    return gram_least_squares(right @ right.T, target @ right.T, support, max_row_nonzeros)


def gram_least_squares(
    gram: torch.Tensor, products: torch.Tensor, support: torch.Tensor, max_row_nonzeros: int = 256
) -> torch.Tensor | None:
    """:func:`rows_least_squares` from ``gram = right @ right.T`` and
    ``products = target @ right.T``, which a caller may have at hand more cheaply."""
    counts = support.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    if width == 0 or width > max_row_nonzeros:
        return None
    ridge = 1e-12 * float(gram.diagonal().mean().clamp_min(1e-300))
    result = torch.zeros_like(support, dtype=DTYPE)
    for rows in torch.argsort(counts, stable=True).split(_GROUP_ROWS):
        group_width = int(counts[rows].max())
        if group_width == 0:
            continue
        solution = _solve_rows(
            gram, products[rows], support[rows], counts[rows], group_width, ridge
        )
        if solution is None:
            return None
        result[rows] = solution
    return result


_GROUP_ROWS = 64


def _solve_rows(gram, products, support, counts, width: int, ridge: float):
    columns = torch.argsort(support.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
    valid = torch.arange(width)[None, :] < counts[:, None]
    systems = gram[columns[:, :, None], columns[:, None, :]]
    systems.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0.0)
    systems.diagonal(dim1=1, dim2=2).add_(torch.where(valid, ridge, 1.0).to(DTYPE))
    rhs = torch.where(valid, products.gather(1, columns), torch.zeros((), dtype=DTYPE))
    cholesky, info = torch.linalg.cholesky_ex(systems)
    if bool((info != 0).any()):
        return None
    solution = torch.cholesky_solve(rhs.unsqueeze(2), cholesky).squeeze(2)
    rows = torch.zeros_like(support, dtype=DTYPE)
    rows.scatter_(1, columns, torch.where(valid, solution, torch.zeros((), dtype=DTYPE)))
    return rows


def polish(state: PALMState, nb_sweeps: int) -> None:
    """Alternate exact least-squares solves for the first and last factors' values (supports
    fixed); keep the result only if it lowers the error."""
    if nb_sweeps <= 0 or len(state.factors) < 1:
        return
    factors = [f.clone() for f in state.factors]
    factors[0] = factors[0] * state.lam
    target = state.target
    before = state.error()
    count = len(factors)
    for _ in range(nb_sweeps):
        right = chain_product(factors[1:])
        right = right if right is not None else identity(factors[0].shape[1], factors[0].shape[1])
        first = rows_least_squares(target, right, state.supports[0])
        if first is None:
            return
        factors[0] = first
        if count > 1:
            left = chain_product(factors[:-1])
            last = rows_least_squares(target.T, left.T, state.supports[-1].T)
            if last is None:
                return
            factors[-1] = last.T
    product = chain_product(factors)
    after = relative_error(product, target)
    if after < before:
        state.factors[:] = factors
        state.lam = 1.0
        state.approximation = product


def fill_supports(state: PALMState) -> None:
    """Grow each support that holds fewer than its nonzeros (row/column projection, or a
    target with few nonzeros) by the positions of the largest gradient entries, with value
    0: the product is unchanged and the layer gets the capacity it was given."""
    factors = state.factors
    for j, support in enumerate(state.supports):
        missing = state.nonzeros[j] - int(support.sum())
        if missing <= 0:
            continue
        left, right = chain_product(factors[:j]), chain_product(factors[j + 1 :])
        residual = state.lam * chain_product(factors) - state.target
        gradient = residual if right is None else residual @ right.T
        gradient = gradient if left is None else left.T @ gradient
        rows, cols = support.shape
        b = state.block
        if b > 1:
            gradient = gradient.reshape(rows // b, b, cols // b, b).square().sum((1, 3))
            taken = support.reshape(rows // b, b, cols // b, b)[:, 0, :, 0]
        else:
            gradient, taken = gradient.abs(), support
        ranked = torch.where(taken, torch.full_like(gradient, -1.0), gradient)
        chosen = largest_entries_mask(ranked.reshape(1, -1), missing // (b * b))
        chosen = chosen.reshape(ranked.shape)
        if b > 1:
            chosen = chosen.repeat_interleave(b, 0).repeat_interleave(b, 1)
        support |= chosen
