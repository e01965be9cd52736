"""H-matrices with their factors, and the two rank allocations: fitted to a matrix, and random.

The approximator takes the SVD of every leaf of the partition once and then hands the budget
out greedily, one step at a time, to the leaf whose next step removes the most squared error per
parameter added. A step is one more singular triplet (``rows + cols`` scalars), or turning the
leaf dense (``rows * cols - rank * (rows + cols)`` more scalars, no error left in it) when that is
the better deal or when the next triplet would make the low-rank form no cheaper than the dense
one. Within a leaf the triplet steps have falling ratios (the singular values fall), so the
greedy choice over leaves is the classic convex-hull allocation; the budget is used exactly up
to the last step that still fits.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from structurednets.validation import as_matrix, check_positive_int
from structurednets_hmat.partition import (
    DEFAULT_ETA,
    DEFAULT_MIN_BLOCK_SIZE,
    HMatrixPartition,
    leaf_groups,
)

__all__ = [
    "HMatrix",
    "allocate_greedy",
    "allocate_uniform",
    "approximate",
    "smallest_nb_parameters",
]


@dataclass(frozen=True)
class HMatrix:
    """An H-matrix: a partition with ranks and the factors of every leaf (float64 tensors).

    ``factors[i]`` belongs to ``partition.leaves[i]``: ``(L, R)`` with ``L`` of shape
    ``(rows, rank)`` and ``R`` of shape ``(rank, cols)`` for a low-rank leaf (the block is
    ``L @ R``), or ``(D,)`` with ``D`` of shape ``(rows, cols)`` for a dense leaf. Arrays are
    accepted and converted.
    """

    partition: HMatrixPartition
    factors: tuple[tuple[torch.Tensor, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.partition, HMatrixPartition):
            raise TypeError(
                f"partition must be an HMatrixPartition, got {type(self.partition).__name__}"
            )
        leaves = self.partition.leaves
        if len(self.factors) != len(leaves):
            raise ValueError(
                f"factors must hold one entry per leaf ({len(leaves)}), got {len(self.factors)}"
            )
        checked = []
        for index, (leaf, factor) in enumerate(zip(leaves, self.factors, strict=True)):
            name = f"factors[{index}]"
            if leaf.dense:
                if len(factor) != 1:
                    raise ValueError(f"{name} must be (D,) for the dense leaf {leaf}")
                checked.append(
                    (as_matrix(f"{name}[0] (D)", factor[0], *leaf.shape, "rows x cols"),)
                )
            else:
                if len(factor) != 2:
                    raise ValueError(f"{name} must be (L, R) for the low-rank leaf {leaf}")
                left = as_matrix(
                    f"{name}[0] (L)", factor[0], leaf.nb_rows, leaf.rank, "rows x rank"
                )
                right = as_matrix(
                    f"{name}[1] (R)", factor[1], leaf.rank, leaf.nb_cols, "rank x cols"
                )
                checked.append((left, right))
        object.__setattr__(self, "factors", tuple(checked))

    @property
    def shape(self) -> tuple[int, int]:
        return self.partition.shape

    @property
    def nb_parameters(self) -> int:
        return self.partition.nb_parameters

    def block(self, index: int) -> torch.Tensor:
        """Leaf ``index`` as a dense ``(rows, cols)`` float64 tensor."""
        factor = self.factors[index]
        return factor[0] if len(factor) == 1 else factor[0] @ factor[1]

    def to_dense(self) -> torch.Tensor:
        """The represented ``(output_dim, input_dim)`` matrix, float64."""
        matrix = torch.zeros(self.shape, dtype=torch.float64)
        for index, leaf in enumerate(self.partition.leaves):
            matrix[leaf.rows, leaf.cols] = self.block(index)
        return matrix


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
class _LeafSpectrum:
    """What the greedy allocation needs from one leaf's SVD."""

    squared_singular_values: np.ndarray  # the leading ones, as many as can ever be used
    energy: float  # squared Frobenius norm of the block


def allocate_greedy(
    partition: HMatrixPartition, spectra: list[_LeafSpectrum], budget: int
) -> HMatrixPartition:
    """Ranks (and dense leaves) that remove the most squared error for ``budget`` scalars.

    Starts from rank 0 everywhere; each step goes to the leaf whose best next step (one more
    triplet, or turning dense) has the highest error removed per scalar added. A step that does
    not fit the remaining budget is replaced by that leaf's other step if that one fits.
    """
    leaves = partition.leaves
    ranks = [0] * len(leaves)
    dense = [False] * len(leaves)
    captured = [0.0] * len(leaves)
    remaining = budget

    def steps(index: int) -> list[tuple[float, int, bool]]:
        """(ratio, cost, to_dense) of the leaf's possible next steps, best first."""
        leaf = leaves[index]
        rows, cols = leaf.shape
        rank = ranks[index]
        spectrum = spectra[index]
        dense_cost = rows * cols - rank * (rows + cols)
        left = max(0.0, spectrum.energy - captured[index])
        options = [(left / dense_cost, dense_cost, True)]
        values = spectrum.squared_singular_values
        if rank + 1 < leaf.dense_rank and rank < values.size:
            options.append((float(values[rank]) / (rows + cols), rows + cols, False))
        options.sort(key=lambda option: (-option[0], option[2]))
        return options

    heap = []
    for index in range(len(leaves)):
        ratio, cost, to_dense = steps(index)[0]
        heap.append((-ratio, index, cost, to_dense))
    heapq.heapify(heap)
    while heap:
        _, index, cost, to_dense = heapq.heappop(heap)
        if cost > remaining:
            # The other step (a triplet, if the best was turning dense) may still fit.
            others = [s for s in steps(index) if s[2] != to_dense and s[1] <= remaining]
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
        ratio, cost, to_dense = steps(index)[0]
        heapq.heappush(heap, (-ratio, index, cost, to_dense))
    return partition.with_ranks(ranks, dense)


def approximate(
    matrix: object,
    budget: int,
    *,
    eta: float = DEFAULT_ETA,
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE,
    partition: HMatrixPartition | None = None,
) -> HMatrix:
    """The H-matrix of at most ``budget`` scalars closest to ``matrix`` that the greedy
    allocation finds, on the partition built with ``eta`` and ``min_block_size`` (or on the
    blocks of ``partition``; its ranks are ignored).

    Each leaf keeps its truncated SVD ``L = U sqrt(S)``, ``R = sqrt(S) V^T`` (both factors of
    the same scale) or becomes the dense block itself. Computed in float64.

    Args:
        matrix: ``(output_dim, input_dim)`` numpy array or tensor.
        budget: the most scalars the H-matrix may hold.

    >>> W = 1.0 / (1.0 + abs(np.subtract.outer(np.arange(512), np.arange(512))))
    >>> hmatrix = approximate(W, budget=512 * 512 // 10)
    >>> float(torch.linalg.norm(hmatrix.to_dense() - torch.from_numpy(W)) / np.linalg.norm(W))
    ... # doctest: +SKIP
    0.0036...
    """
    if isinstance(matrix, (np.ndarray, torch.Tensor)) and len(matrix.shape) == 2:
        output_dim, input_dim = matrix.shape
    else:
        shape = getattr(matrix, "shape", None)
        raise ValueError(f"matrix must be a 2-D array or tensor, got shape {shape}")
    target = as_matrix("matrix", matrix, output_dim, input_dim, "output_dim x input_dim")
    budget = check_positive_int("budget", budget)
    if partition is None:
        partition = HMatrixPartition.build(output_dim, input_dim, eta, min_block_size)
    elif partition.shape != (output_dim, input_dim):
        raise ValueError(
            f"partition is for a {partition.shape} matrix, but matrix has shape {tuple(target.shape)}"
        )
    leaves = partition.leaves
    spectra: list[_LeafSpectrum | None] = [None] * len(leaves)
    vectors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for (rows, cols), indices in leaf_groups(leaves).items():
        # Triplets a leaf can ever use: fewer than the dense rank, and within the budget.
        usable = min(leaves[indices[0]].dense_rank - 1, budget // (rows + cols))
        blocks = torch.stack([target[leaves[i].rows, leaves[i].cols] for i in indices])
        energies = (blocks**2).sum(dim=(1, 2))
        if usable > 0:
            U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)
            U, S, Vh = U[:, :, :usable], S[:, :usable], Vh[:, :usable]
        else:
            S = blocks.new_zeros(len(indices), 0)
        for position, index in enumerate(indices):
            spectra[index] = _LeafSpectrum((S[position] ** 2).numpy(), float(energies[position]))
            if usable > 0:
                vectors[index] = (U[position], S[position], Vh[position])
    ranked = allocate_greedy(partition, spectra, budget)
    factors: list[tuple[torch.Tensor, ...]] = []
    for index, leaf in enumerate(ranked.leaves):
        if leaf.dense:
            factors.append((target[leaf.rows, leaf.cols].clone(),))
        elif leaf.rank == 0:
            factors.append((target.new_zeros(leaf.nb_rows, 0), target.new_zeros(0, leaf.nb_cols)))
        else:
            U, S, Vh = vectors[index]
            root = S[: leaf.rank].sqrt()
            factors.append((U[:, : leaf.rank] * root, root[:, None] * Vh[: leaf.rank]))
    return HMatrix(ranked, tuple(factors))


def relative_error(approximation: torch.Tensor, target: object) -> float:
    """``||approximation - target||_F / ||target||_F`` (float64)."""
    target = torch.as_tensor(target, dtype=torch.float64)
    difference = approximation.detach().to(torch.float64) - target
    return float(torch.linalg.norm(difference) / max(torch.linalg.norm(target), math.ulp(0.0)))
