"""The fit of an H-matrix to a matrix: :func:`fit_hmat`, the entry point of the layer's fit.

The fit takes the SVD of every leaf of a partition once and hands the budget out with the
greedy allocation (:func:`~structurednets_hmat.allocate_greedy`). With ``merge_blocks=True`` it
also chooses which split blocks of the block cluster tree to keep whole
(:mod:`structurednets_hmat.tree_cut`). With neither ``min_block_size`` nor ``merge_blocks``
given it searches: each candidate's squared error is known from its allocation before any
factor is built, and only the kept candidate's factors are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from structurednets.plugin import as_matrix, balanced_factors, check_positive_int
from structurednets_hmat.allocation import LeafSpectrum, allocate_greedy
from structurednets_hmat.cost import check_max_cost_ratio, cost_ratio, partition_cost
from structurednets_hmat.hmatrix import HMatrix
from structurednets_hmat.partition import (
    DEFAULT_ETA,
    DEFAULT_MIN_BLOCK_SIZE,
    HMatrixPartition,
    TreeNode,
    block_cluster_tree,
)
from structurednets_hmat.spectra import (
    BlockSvd,
    SpectrumCache,
    block_spectra,
    cached_spectra,
    leading_triplets,
)
from structurednets_hmat.tree_cut import best_cut

__all__ = ["SEARCH_MARGIN", "SEARCH_MIN_BLOCK_SIZES", "fit_hmat"]


SEARCH_MIN_BLOCK_SIZES = (DEFAULT_MIN_BLOCK_SIZE, 2)
"""The minimum block sizes the default fit tries, coarsest (fastest layer) first."""

SEARCH_MARGIN = 1e-3
"""How much lower (relative Frobenius error) a candidate of the default fit must make the error
to replace the coarser, earlier one: smaller blocks cost speed, merged blocks change the layer."""


def fit_hmat(
    matrix: object,
    budget: int,
    *,
    eta: float = DEFAULT_ETA,
    min_block_size: int | None = None,
    partition: HMatrixPartition | None = None,
    merge_blocks: bool | None = None,
    max_cost_ratio: float | None = None,
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
        max_cost_ratio: a bound on the layer's ``cost_ratio()`` (forward plus backward
            multiply-adds at batch 256 against ``nn.Linear``; see
            :mod:`structurednets_hmat.cost`). Each candidate's allocation is limited to what
            the bound allows (fewer parameters where the buckets' padding costs extra); a
            candidate that cannot meet it is skipped. Raises ``ValueError`` naming the
            smallest ratio reachable (one block at rank 1) when none can.

    The search keeps the most accurate candidate as above, then, among the candidates whose
    error is within :data:`SEARCH_MARGIN` of it, the cheapest: the fewest multiply-adds, then
    the fewest leaves (one block runs as plain low rank).

    >>> from structurednets.numerics import relative_error
    >>> W = 1.0 / (1.0 + abs(np.subtract.outer(np.arange(256), np.arange(256))))
    >>> hmatrix = fit_hmat(W, budget=256 * 256 // 4)
    >>> hmatrix.nb_parameters <= 256 * 256 // 4, relative_error(hmatrix.to_dense(), W) < 1e-5
    (True, True)
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
    bound = check_max_cost_ratio(max_cost_ratio)
    if bound is not None:  # a layer's multiply-adds per input are at least its parameters
        budget = max(1, min(budget, int(bound * output_dim * input_dim)))
    if min_block_size is None:
        min_block_size = DEFAULT_MIN_BLOCK_SIZE
    cache: SpectrumCache = {}
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
        candidates = [_standard_candidate(target, partition, budget, cache)]
        factor = 1.0
    elif search:
        tree = block_cluster_tree(output_dim, input_dim, eta, SEARCH_MIN_BLOCK_SIZES[0])
        candidates = _merged_candidates(target, tree, budget, cache)
        for size in SEARCH_MIN_BLOCK_SIZES[1:]:
            blocks = HMatrixPartition.build(output_dim, input_dim, eta, size)
            candidates.append(_standard_candidate(target, blocks, budget, cache))
        factor = (1 - SEARCH_MARGIN) ** 2
    elif merge_blocks:
        tree = block_cluster_tree(output_dim, input_dim, eta, min_block_size)
        candidates = _merged_candidates(target, tree, budget, cache)
        factor = 1 - 1e-12
    else:
        blocks = HMatrixPartition.build(output_dim, input_dim, eta, min_block_size)
        candidates = [_standard_candidate(target, blocks, budget, cache)]
        factor = 1.0
    if bound is not None:
        candidates = _within_cost(candidates, bound, budget)
    return _build(target, _choose(candidates, factor))


@dataclass(frozen=True)
class _Candidate:
    """A greedily allocated partition with its squared error and the spectra it was allocated
    by; ``vectors`` holds the singular vectors already known, by leaf index (merged blocks get
    theirs only if the candidate is chosen)."""

    error: float
    ranked: HMatrixPartition
    spectra: tuple[LeafSpectrum, ...]
    vectors: dict[int, BlockSvd]


def _choose(candidates: list[_Candidate], factor: float) -> _Candidate:
    """The first candidate, replaced by each later one whose squared error is below ``factor``
    times the kept one's; then, of those whose squared error is below the kept one's divided
    by ``factor`` (as accurate, within the margin), the cheapest: fewest multiply-adds per
    input, then fewest leaves, then the earliest."""
    best = candidates[0]
    for candidate in candidates[1:]:
        if candidate.error < best.error * factor:
            best = candidate
    if len(candidates) == 1:
        return best
    close = [c for c in candidates if c is best or c.error * factor <= best.error]
    return min(close, key=lambda c: (partition_cost(c.ranked, 1).forward, len(c.ranked.leaves)))


def _within_cost(candidates: list[_Candidate], bound: float, budget: int) -> list[_Candidate]:
    """The candidates whose cost ratio is at most ``bound``: one that costs more is allocated
    again on its blocks with a budget smaller by the cost above the bound, until it fits.
    Raises ``ValueError`` when none fits, naming the cheapest ratio any could reach."""
    kept = []
    for candidate in candidates:
        ranked, limit = candidate.ranked, budget
        blocks = ranked.with_ranks([0] * len(ranked.leaves))
        dims = ranked.output_dim * ranked.input_dim
        for _ in range(32):
            if ranked.nb_parameters == 0:  # the bound leaves no room for any block
                break
            ratio = cost_ratio(ranked)
            if ratio <= bound:
                if ranked is not candidate.ranked:
                    error = _discarded_energy(ranked, list(candidate.spectra))
                    candidate = _Candidate(error, ranked, candidate.spectra, candidate.vectors)
                kept.append(candidate)
                break
            limit -= max(1, math.ceil((ratio - bound) * dims))
            if limit <= 0:
                break
            ranked = allocate_greedy(blocks, list(candidate.spectra), limit)
    if kept:
        return kept
    # One leaf runs leaf by leaf: its multiply-adds per input are its parameters.
    smallest = min(
        min(leaf.nb_rows + leaf.nb_cols, leaf.nb_rows * leaf.nb_cols) / dims
        for candidate in candidates
        for leaf in candidate.ranked.leaves
    )
    raise ValueError(
        f"max_cost_ratio must be at least {smallest:.4g} for this fit (its cheapest block "
        f"at rank 1), got {bound:g}"
    )


def _standard_candidate(
    target: torch.Tensor,
    partition: HMatrixPartition,
    budget: int,
    cache: SpectrumCache,
) -> _Candidate:
    """The greedy allocation on the blocks of ``partition`` (its ranks ignored)."""
    blocks = partition.with_ranks([0] * len(partition.leaves))
    spectra, vectors = cached_spectra(target, list(blocks.leaves), budget, cache)
    return _allocated(blocks, spectra, vectors, budget)


def _allocated(
    start: HMatrixPartition,
    spectra: list[LeafSpectrum],
    vectors: dict[int, BlockSvd],
    budget: int,
) -> _Candidate:
    """The candidate that the greedy allocation makes of ``start`` (its ranks kept as a floor)."""
    ranked = allocate_greedy(start, spectra, budget)
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
                svd = leading_triplets(target[leaf.rows, leaf.cols], leaf.rank)
            factors.append(balanced_factors(svd.U, svd.S, svd.Vh, leaf.rank))
    return HMatrix(chosen.ranked, tuple(factors))


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
    cache: SpectrumCache,
) -> list[_Candidate]:
    """The candidates of ``merge_blocks=True``, each filled greedily: the standard partition
    (the tree's leaves), the best cut (:func:`~structurednets_hmat.tree_cut.best_cut`) and the
    whole matrix as one block."""
    output_dim, input_dim = target.shape
    node_spectra, node_vectors = _node_spectra(target, tree, budget, cache)
    cut = best_cut(tree, node_spectra, budget)
    starts = [
        {position: (0, False) for position, node in enumerate(tree) if not node.children},
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
        vectors = {
            index: node_vectors[node] for index, node in enumerate(nodes) if node in node_vectors
        }
        candidates.append(_allocated(start, [node_spectra[n] for n in nodes], vectors, budget))
    return candidates


def _node_spectra(
    target: torch.Tensor,
    tree: list[TreeNode],
    budget: int,
    cache: SpectrumCache,
) -> tuple[list[LeafSpectrum], dict[int, BlockSvd]]:
    """Spectrum of every node of the tree, and singular vectors (by tree position) of its
    leaves: the tree's leaves through the cache, its inner nodes values only."""
    inner = [position for position, node in enumerate(tree) if node.children]
    outer = [position for position, node in enumerate(tree) if not node.children]
    outer_spectra, outer_vectors = cached_spectra(
        target, [tree[p].block for p in outer], budget, cache
    )
    inner_spectra, _ = block_spectra(
        target, [tree[p].block for p in inner], budget, with_vectors=False
    )
    node_spectra: list[LeafSpectrum] = [None] * len(tree)  # type: ignore[list-item]
    for position, spectrum in zip(outer + inner, outer_spectra + inner_spectra, strict=True):
        node_spectra[position] = spectrum
    node_vectors = {outer[number]: svd for number, svd in outer_vectors.items()}
    return node_spectra, node_vectors
