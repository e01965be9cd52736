"""The two rank allocations over a partition: the random start's, and the fit's greedy one.

:func:`allocate_uniform` gives a random layer rank 1 in every leaf and grows the ranks evenly.
:func:`allocate_greedy` hands a fitted matrix's budget out one step at a time to the leaf whose
next step removes the most squared error per parameter added. A step is one more singular
triplet (``rows + cols`` scalars), or turning the leaf dense (``rows * cols - rank * (rows +
cols)`` more scalars, no error left in it) when that is the better deal or when the next
triplet would make the low-rank form no cheaper than the dense one. Within a leaf the triplet
steps have falling ratios (the singular values fall), so the greedy choice over leaves is the
classic convex-hull allocation; the budget is used exactly up to the last step that still fits.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from structurednets_hmat.partition import HMatrixPartition, Leaf

__all__ = ["LeafSpectrum", "allocate_greedy", "allocate_uniform", "smallest_nb_parameters"]


def smallest_nb_parameters(partition: HMatrixPartition) -> int:
    """Scalars of the smallest full H-matrix on these blocks: rank 1 everywhere, or dense where
    a dense block is no dearer than rank 1 (blocks with a side of 1)."""
    return sum(
        min(leaf.nb_rows + leaf.nb_cols, leaf.nb_rows * leaf.nb_cols) for leaf in partition.leaves
    )


def allocate_uniform(partition: HMatrixPartition, budget: int) -> HMatrixPartition:
    """Ranks for a random start: every leaf rank 1 (dense where that is no dearer), then one
    more rank at a time to the leaf of lowest ``rank / min(rows, cols)`` (larger blocks first on
    ties), a leaf turning dense once that is no dearer, until no step fits the budget.

    The budget must hold :func:`smallest_nb_parameters`; the result is deterministic.
    """
    leaves = partition.leaves
    ranks = [0] * len(leaves)
    dense = [False] * len(leaves)
    remaining = budget
    heap: list[tuple[float, int, int]] = []
    for index, leaf in enumerate(leaves):
        if leaf.dense_rank <= 1:
            dense[index] = True
            remaining -= leaf.nb_rows * leaf.nb_cols
        else:
            ranks[index] = 1
            remaining -= leaf.nb_rows + leaf.nb_cols
            smaller = min(leaf.shape)
            heap.append((2 / smaller, -smaller, index))
    if remaining < 0:
        raise ValueError(f"budget {budget} is below the smallest form's {budget - remaining}")
    heapq.heapify(heap)
    while heap:
        _, order, index = heapq.heappop(heap)
        leaf = leaves[index]
        rows, cols = leaf.shape
        rank = ranks[index]
        to_dense = rank + 1 >= leaf.dense_rank
        cost = rows * cols - rank * (rows + cols) if to_dense else rows + cols
        if cost > remaining:
            continue  # the step to dense, if it is that, is the cheapest this leaf has left
        remaining -= cost
        if to_dense:
            dense[index] = True
        else:
            ranks[index] = rank + 1
            heapq.heappush(heap, ((rank + 2) / -order, order, index))
    return partition.with_ranks(ranks, dense)


@dataclass(frozen=True)
class LeafSpectrum:
    """What the greedy allocation needs to know about one block.

    Attributes:
        squared_singular_values: the leading squared singular values, largest first, as many
            as the block can ever use (fewer than its dense rank, within the budget).
        energy: the block's squared Frobenius norm.
    """

    squared_singular_values: np.ndarray
    energy: float


def allocate_greedy(
    partition: HMatrixPartition, spectra: list[LeafSpectrum], budget: int
) -> HMatrixPartition:
    """Ranks (and dense leaves) that remove the most squared error for ``budget`` scalars.

    Starts from the partition's ranks (usually 0 everywhere); each step goes to the leaf whose
    best next step (one more triplet, or turning dense) has the highest error removed per scalar
    added. A step that does not fit the remaining budget is replaced by that leaf's other step
    if that one fits. ``spectra[i]`` belongs to ``partition.leaves[i]``.
    """
    leaves = partition.leaves
    ranks = [0 if leaf.dense else leaf.rank for leaf in leaves]
    dense = [leaf.dense for leaf in leaves]
    captured = [
        float(spectrum.squared_singular_values[:rank].sum())
        for spectrum, rank in zip(spectra, ranks, strict=True)
    ]
    remaining = budget - partition.nb_parameters
    if remaining < 0:
        raise ValueError(f"the partition holds {partition.nb_parameters} > budget {budget}")

    def best_step(index: int) -> tuple[float, int, int, bool]:
        ratio, cost, to_dense = _next_steps(
            leaves[index], ranks[index], spectra[index], captured[index]
        )[0]
        return (-ratio, index, cost, to_dense)

    heap = [best_step(index) for index in range(len(leaves)) if not dense[index]]
    heapq.heapify(heap)
    while heap:
        _, index, cost, to_dense = heapq.heappop(heap)
        if cost > remaining:
            # The other step (a triplet, if the best was turning dense) may still fit.
            steps = _next_steps(leaves[index], ranks[index], spectra[index], captured[index])
            others = [step for step in steps if step[2] != to_dense and step[1] <= remaining]
            if others:
                ratio, cost, to_dense = others[0]
                heapq.heappush(heap, (-ratio, index, cost, to_dense))
            continue
        remaining -= cost
        if to_dense:
            dense[index] = True
            continue
        captured[index] += float(spectra[index].squared_singular_values[ranks[index]])
        ranks[index] += 1
        heapq.heappush(heap, best_step(index))
    return partition.with_ranks(ranks, dense)


def _next_steps(
    leaf: Leaf, rank: int, spectrum: LeafSpectrum, captured: float
) -> list[tuple[float, int, bool]]:
    """``(ratio, cost, to_dense)`` of a leaf's possible next steps at ``rank``, best first:
    turning dense, and one more triplet while that keeps the low-rank form cheaper."""
    rows, cols = leaf.shape
    dense_cost = rows * cols - rank * (rows + cols)
    left = max(0.0, spectrum.energy - captured)
    options = [(left / dense_cost, dense_cost, True)]
    values = spectrum.squared_singular_values
    if rank + 1 < leaf.dense_rank and rank < values.size:
        options.append((float(values[rank]) / (rows + cols), rows + cols, False))
    options.sort(key=lambda option: (-option[0], option[2]))
    return options
