"""H-matrices with their factors, and the two rank allocations: fitted to a matrix, and random.

The approximator takes the SVD of every leaf of the partition once and then hands the budget
out greedily, one step at a time, to the leaf whose next step removes the most squared error per
parameter added. A step is one more singular triplet (``rows + cols`` scalars), or turning the
leaf dense (``rows * cols - rank * (rows + cols)`` more scalars, no error left in it) when that is
the better deal or when the next triplet would make the low-rank form no cheaper than the dense
one. Within a leaf the triplet steps have falling ratios (the singular values fall), so the
greedy choice over leaves is the classic convex-hull allocation; the budget is used exactly up
to the last step that still fits.

With ``merge_blocks=True`` the approximator also chooses which split blocks of the block
cluster tree to keep whole (see :func:`approximate`).
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
    Leaf,
    TreeNode,
    block_cluster_tree,
    leaf_groups,
)

__all__ = [
    "HMatrix",
    "LeafSpectrum",
    "allocate_greedy",
    "allocate_uniform",
    "approximate",
    "relative_error",
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
        if not dense[index]:
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


@dataclass(frozen=True)
class _Svd:
    """The leading singular triplets of a block (as many as it can ever use)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def _spectra(
    target: torch.Tensor, blocks: list[Leaf], budget: int, with_vectors: bool
) -> tuple[list[LeafSpectrum], dict[int, _Svd]]:
    """Spectrum of every block (and its singular vectors if asked), same-shaped blocks in one
    batched SVD; only the triplets a block can ever use are kept: fewer than its dense rank,
    and within the budget."""
    spectra: list[LeafSpectrum | None] = [None] * len(blocks)
    vectors: dict[int, _Svd] = {}
    for (rows, cols), indices in leaf_groups(blocks).items():
        usable = min(blocks[indices[0]].dense_rank - 1, budget // (rows + cols))
        stacked = torch.stack([target[blocks[i].rows, blocks[i].cols] for i in indices])
        energies = (stacked**2).sum(dim=(1, 2))
        if usable == 0:
            squares = stacked.new_zeros(len(indices), 0)
        elif with_vectors:
            U, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
            U, S, Vh = U[:, :, :usable], S[:, :usable], Vh[:, :usable]
            squares = S**2
        else:
            # Values only: eigenvalues of the smaller Gram matrix, 2-3 times faster than
            # svdvals, accurate to rounding relative to the largest (what the allocation uses).
            gram = stacked.mT @ stacked if cols <= rows else stacked @ stacked.mT
            squares = torch.linalg.eigvalsh(gram).flip(-1)[:, :usable].clamp_min(0.0)
        for position, index in enumerate(indices):
            spectra[index] = LeafSpectrum(squares[position].numpy(), float(energies[position]))
            if usable > 0 and with_vectors:
                vectors[index] = _Svd(U[position], S[position], Vh[position])
    return spectra, vectors


@dataclass(frozen=True)
class _Cut:
    """Blocks of the tree chosen as leaves (tree positions), with their ranks and forms."""

    nodes: tuple[int, ...]
    ranks: tuple[int, ...]
    dense: tuple[bool, ...]
    nb_parameters: int


def _best_cut(tree: list[TreeNode], spectra: list[LeafSpectrum], budget: int) -> _Cut:
    """The cut of the block cluster tree (each inner node either a leaf itself or split as in
    the standard partition) and ranks minimising ``error + lam * parameters``, for the
    smallest ``lam`` (found by bisection) whose minimiser fits the budget.

    These are the allocations on the lower convex hull of (parameters, error) over all cuts
    and ranks; ties keep the standard partition.
    """
    sizes = np.array([[n.block.nb_rows, n.block.nb_cols] for n in tree], dtype=np.float64)
    per_rank = sizes.sum(axis=1)
    dense_size = sizes.prod(axis=1)
    width = max(1, max(spectrum.squared_singular_values.size for spectrum in spectra))
    values = np.full((len(tree), width), -np.inf)
    for position, spectrum in enumerate(spectra):
        values[position, : spectrum.squared_singular_values.size] = spectrum.squared_singular_values
    captured = np.concatenate(
        [np.zeros((len(tree), 1)), np.cumsum(np.where(np.isfinite(values), values, 0.0), axis=1)],
        axis=1,
    )
    energy = np.array([spectrum.energy for spectrum in spectra])
    rows = np.arange(len(tree))

    def solve(lam: float) -> _Cut:
        rank = (values > lam * per_rank[:, None]).sum(axis=1)
        low_cost = energy - captured[rows, rank] + lam * rank * per_rank
        dense = lam * dense_size < low_cost
        own_cost = np.where(dense, lam * dense_size, low_cost)
        own_params = np.where(dense, dense_size, rank * per_rank)
        cost = own_cost.copy()
        params = own_params.copy()
        split = np.zeros(len(tree), dtype=bool)
        for position in range(len(tree) - 1, -1, -1):  # children before parents
            children = tree[position].children
            if children:
                children_cost = sum(cost[child] for child in children)
                if children_cost <= own_cost[position]:
                    split[position] = True
                    cost[position] = children_cost
                    params[position] = sum(params[child] for child in children)
        nodes, stack = [], [0]
        while stack:
            position = stack.pop()
            if split[position]:
                stack.extend(tree[position].children)
            else:
                nodes.append(position)
        nodes.sort()
        return _Cut(
            tuple(nodes),
            tuple(int(rank[n]) for n in nodes),
            tuple(bool(dense[n]) for n in nodes),
            int(params[0]),
        )

    # lam above every ratio: rank 0 everywhere, no parameters.
    ratios = np.where(np.isfinite(values[:, 0]), values[:, 0], 0.0) / per_rank
    high = 2.0 * max(float(ratios.max()), float((energy / dense_size).max()), 1e-300)
    low = high * 1e-30
    best = solve(high)
    if solve(low).nb_parameters <= budget:
        return solve(low)
    for _ in range(80):  # bisection on a log scale
        middle = math.sqrt(low * high)
        cut = solve(middle)
        if cut.nb_parameters <= budget:
            high, best = middle, cut
        else:
            low = middle
    return best


_SpectrumCache = dict[tuple[int, int, int, int], tuple[LeafSpectrum, _Svd | None]]
"""Spectra and singular vectors of blocks by (row start, row stop, col start, col stop),
shared by the candidates of one fit."""

SEARCH_MIN_BLOCK_SIZES = (DEFAULT_MIN_BLOCK_SIZE, 2)
"""The minimum block sizes the default fit tries, coarsest (fastest layer) first."""

SEARCH_MARGIN = 1e-3
"""How much lower (relative Frobenius error) a candidate of the default fit must make the error
to replace the coarser, earlier one: smaller blocks cost speed, merged blocks change the layer."""


def approximate(
    matrix: object,
    budget: int,
    *,
    eta: float = DEFAULT_ETA,
    min_block_size: int | None = None,
    partition: HMatrixPartition | None = None,
    merge_blocks: bool | None = None,
) -> HMatrix:
    """The H-matrix of at most ``budget`` scalars closest to ``matrix`` that the greedy
    allocation finds, on the partition built with ``eta`` and ``min_block_size`` (or on the
    blocks of ``partition``; its ranks are ignored).

    Each leaf keeps its truncated SVD ``L = U sqrt(S)``, ``R = sqrt(S) V^T`` (both factors of
    the same scale) or becomes the dense block itself. Computed in float64.

    With neither ``min_block_size``, ``merge_blocks`` nor ``partition`` given, the fit searches:
    the standard partition with ``min_block_size`` 16, the merged blocks of its tree
    (``merge_blocks=True``) and the standard partition with ``min_block_size`` 2 are each
    allocated greedily (their squared errors are known before any factor is built; blocks
    shared between them are decomposed once), and a later candidate replaces the one kept so
    far only if it lowers the relative error by more than :data:`SEARCH_MARGIN` (0.1 %). So the
    result is never worse than ``min_block_size=16, merge_blocks=False``. Passing either option
    skips the search; the one left out then takes its plain default (16, ``False``).

    Args:
        matrix: ``(output_dim, input_dim)`` numpy array or tensor.
        budget: the most scalars the H-matrix may hold.
        min_block_size: see :meth:`HMatrixPartition.build`; ``None`` searches (above).
        merge_blocks: also consider keeping any split block of the tree whole (up to the whole
            matrix as one low-rank block): the cut of the block cluster tree and the ranks that
            minimise error plus a price per parameter, then the greedy fill on that cut. Never
            worse than plain low rank; costs the singular values of every split block.
            ``None`` searches (above).

    >>> W = 1.0 / (1.0 + abs(np.subtract.outer(np.arange(512), np.arange(512))))
    >>> hmatrix = approximate(W, budget=512 * 512 // 10)
    >>> relative_error(hmatrix.to_dense(), W) < 4.7e-3
    True
    """
    if isinstance(matrix, (np.ndarray, torch.Tensor)) and len(matrix.shape) == 2:
        output_dim, input_dim = matrix.shape
    else:
        shape = getattr(matrix, "shape", None)
        raise ValueError(f"matrix must be a 2-D array or tensor, got shape {shape}")
    target = as_matrix("matrix", matrix, output_dim, input_dim, "output_dim x input_dim")
    budget = check_positive_int("budget", budget)
    if merge_blocks is not None and not isinstance(merge_blocks, bool):
        raise TypeError(f"merge_blocks must be True or False, got {merge_blocks!r}")
    search = partition is None and min_block_size is None and merge_blocks is None
    if min_block_size is None:
        min_block_size = DEFAULT_MIN_BLOCK_SIZE
    cache: _SpectrumCache = {}
    if partition is not None:
        if merge_blocks:
            raise ValueError(
                "merge_blocks needs the block cluster tree; pass eta and "
                "min_block_size instead of partition"
            )
        if partition.shape != (output_dim, input_dim):
            raise ValueError(
                f"partition is for a {partition.shape} matrix, but matrix has shape "
                f"{tuple(target.shape)}"
            )
        chosen = _standard_candidate(target, partition, budget, cache)
    elif search:
        tree = block_cluster_tree(output_dim, input_dim, eta, SEARCH_MIN_BLOCK_SIZES[0])
        candidates = _merged_candidates(target, tree, budget, cache)
        for size in SEARCH_MIN_BLOCK_SIZES[1:]:
            blocks = HMatrixPartition.build(output_dim, input_dim, eta, size)
            candidates.append(_standard_candidate(target, blocks, budget, cache))
        chosen = _choose(candidates, (1 - SEARCH_MARGIN) ** 2)
    elif merge_blocks:
        tree = block_cluster_tree(output_dim, input_dim, eta, min_block_size)
        chosen = _choose(_merged_candidates(target, tree, budget, cache), 1 - 1e-12)
    else:
        blocks = HMatrixPartition.build(output_dim, input_dim, eta, min_block_size)
        chosen = _standard_candidate(target, blocks, budget, cache)
    return _build(target, chosen)


@dataclass(frozen=True)
class _Candidate:
    """A greedily allocated partition with its squared error and the spectra it was allocated
    by; ``vectors`` holds the singular vectors already known, by leaf index (merged blocks get
    theirs only if the candidate is chosen)."""

    error: float
    ranked: HMatrixPartition
    spectra: tuple[LeafSpectrum, ...]
    vectors: dict[int, _Svd]


def _choose(candidates: list[_Candidate], factor: float) -> _Candidate:
    """The first candidate, replaced by each later one whose squared error is below ``factor``
    times the kept one's."""
    best = candidates[0]
    for candidate in candidates[1:]:
        if candidate.error < best.error * factor:
            best = candidate
    return best


def _key(block: Leaf) -> tuple[int, int, int, int]:
    return (block.row_start, block.row_stop, block.col_start, block.col_stop)


def _cached_spectra(
    target: torch.Tensor,
    blocks: list[Leaf],
    budget: int,
    cache: _SpectrumCache,
) -> tuple[list[LeafSpectrum], dict[int, _Svd]]:
    """:func:`_spectra` with singular vectors, computing only blocks not yet in ``cache`` (by
    row and column range: the blocks far from the diagonal are the same in every partition)."""
    missing: dict[tuple[int, int, int, int], Leaf] = {}
    for block in blocks:
        if _key(block) not in cache:
            missing.setdefault(_key(block), block)
    if missing:
        new = list(missing.values())
        spectra, vectors = _spectra(target, new, budget, with_vectors=True)
        for index, block in enumerate(new):
            cache[_key(block)] = (spectra[index], vectors.get(index))
    entries = [cache[_key(block)] for block in blocks]
    return [entry[0] for entry in entries], {
        index: entry[1] for index, entry in enumerate(entries) if entry[1] is not None
    }


def _standard_candidate(
    target: torch.Tensor,
    partition: HMatrixPartition,
    budget: int,
    cache: _SpectrumCache,
) -> _Candidate:
    """The greedy allocation on the blocks of ``partition`` (its ranks ignored)."""
    blocks = partition.with_ranks([0] * len(partition.leaves))
    spectra, vectors = _cached_spectra(target, list(blocks.leaves), budget, cache)
    ranked = allocate_greedy(blocks, spectra, budget)
    return _Candidate(_discarded_energy(ranked, spectra), ranked, tuple(spectra), vectors)


def _build(target: torch.Tensor, chosen: _Candidate) -> HMatrix:
    """The factors of the chosen allocation: truncated SVDs, dense blocks, empty factors."""
    factors: list[tuple[torch.Tensor, ...]] = []
    for index, leaf in enumerate(chosen.ranked.leaves):
        if leaf.dense:
            factors.append((target[leaf.rows, leaf.cols].clone(),))
        elif leaf.rank == 0:
            factors.append((target.new_zeros(leaf.nb_rows, 0), target.new_zeros(0, leaf.nb_cols)))
        else:
            svd = chosen.vectors.get(index)
            if svd is None:  # a merged block: its leading singular vectors now
                svd = _leading_triplets(target[leaf.rows, leaf.cols], leaf.rank)
            root = svd.S[: leaf.rank].sqrt()
            factors.append((svd.U[:, : leaf.rank] * root, root[:, None] * svd.Vh[: leaf.rank]))
    return HMatrix(chosen.ranked, tuple(factors))


def _leading_triplets(block: torch.Tensor, rank: int) -> _Svd:
    """The ``rank`` leading singular triplets of a (large, merged) block, from the eigenvectors
    of its smaller Gram matrix: about half the time of an SVD, and the same subspace to
    rounding (what the approximation error depends on)."""
    transposed = block.shape[0] < block.shape[1]
    matrix = block.T if transposed else block  # tall: rows >= cols
    values, vectors = torch.linalg.eigh(matrix.T @ matrix)
    V = vectors[:, -rank:].flip(1)
    S = values[-rank:].flip(0).clamp_min(0.0).sqrt()
    product = matrix @ V  # U * S
    scale = torch.where(S > 0, S, torch.ones_like(S))
    U = torch.where(S > 0, product / scale, torch.zeros_like(product))
    if transposed:
        return _Svd(V, S, U.T)
    return _Svd(U, S, V.T)


def _discarded_energy(partition: HMatrixPartition, spectra: list[LeafSpectrum]) -> float:
    """Squared error of the allocation: each low-rank leaf's energy beyond its rank."""
    return sum(
        max(0.0, spectrum.energy - float(spectrum.squared_singular_values[: leaf.rank].sum()))
        for leaf, spectrum in zip(partition.leaves, spectra, strict=True)
        if not leaf.dense
    )


def _merged_candidates(
    target: torch.Tensor,
    tree: list[TreeNode],
    budget: int,
    cache: _SpectrumCache,
) -> list[_Candidate]:
    """The candidates of ``merge_blocks=True``, each filled greedily: the standard partition
    (the tree's leaves), the best cut (:func:`_best_cut`) and the whole matrix as one block."""
    output_dim, input_dim = target.shape
    inner = [position for position, node in enumerate(tree) if node.children]
    outer = [position for position, node in enumerate(tree) if not node.children]
    outer_spectra, outer_vectors = _cached_spectra(
        target, [tree[p].block for p in outer], budget, cache
    )
    inner_spectra, _ = _spectra(target, [tree[p].block for p in inner], budget, with_vectors=False)
    node_spectra: list[LeafSpectrum] = [None] * len(tree)  # type: ignore[list-item]
    node_vectors: dict[int, _Svd] = {}
    for position, spectrum in zip(outer, outer_spectra, strict=True):
        node_spectra[position] = spectrum
    for number, position in enumerate(outer):
        if number in outer_vectors:
            node_vectors[position] = outer_vectors[number]
    for position, spectrum in zip(inner, inner_spectra, strict=True):
        node_spectra[position] = spectrum
    cut = _best_cut(tree, node_spectra, budget)
    starts = [
        {position: (0, False) for position in outer},  # the standard partition
        {n: (rank, dense) for n, rank, dense in zip(cut.nodes, cut.ranks, cut.dense, strict=True)},
        {0: (0, False)},  # the whole matrix as one block: plain low rank
    ]
    candidates = []
    for start_ranks in starts:
        nodes = sorted(
            start_ranks, key=lambda n: (tree[n].block.row_start, tree[n].block.col_start)
        )
        start = HMatrixPartition(
            output_dim,
            input_dim,
            tree[0].eta,
            tree[0].min_block_size,
            tuple(tree[n].block for n in nodes),
        ).with_ranks([start_ranks[n][0] for n in nodes], [start_ranks[n][1] for n in nodes])
        spectra = [node_spectra[n] for n in nodes]
        ranked = allocate_greedy(start, spectra, budget)
        vectors = {
            index: node_vectors[node] for index, node in enumerate(nodes) if node in node_vectors
        }
        candidates.append(
            _Candidate(_discarded_energy(ranked, spectra), ranked, tuple(spectra), vectors)
        )
    return candidates


def relative_error(approximation: torch.Tensor, target: object) -> float:
    """``||approximation - target||_F / ||target||_F`` (float64)."""
    target = torch.as_tensor(target, dtype=torch.float64)
    difference = approximation.detach().to(torch.float64) - target
    return float(torch.linalg.norm(difference) / max(torch.linalg.norm(target), math.ulp(0.0)))
