"""Fitting a product of sparse matrices to a dense matrix: :func:`fit_psm`.

Hierarchical PALM (Le Magoarou and Gribonval, 2016): ``X ~ lam * S_1 S_2 ... S_J`` with each
``S_j`` projected onto its ``k_j`` largest entries and normalised, ``lam`` a scalar.

- :mod:`.projections`: the projections onto sparse supports;
- :mod:`.palm`: PALM sweeps (one projected gradient step per factor, then ``lam``);
- :mod:`.hierarchical`: one hierarchical factorisation under one :class:`Strategy`;
- :mod:`.search`: the search over strategies and the work budget (:class:`PALMSettings`);
- :mod:`.least_squares`: exact least squares on fixed supports after PALM.

Everything is computed in float64 on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from structurednets.plugin import as_matrix, check_positive_int, torch_threads
from structurednets_psm.fit.hierarchical import (
    Factorization,
    Strategy,
    hierarchical_factorization,
)
from structurednets_psm.fit.projections import largest_entries_mask, project
from structurednets_psm.fit.search import PALMSettings, candidate_splits, run_search
from structurednets_psm.layout import (
    check_block_size,
    check_max_cost_ratio,
    check_nnz_split,
    check_nonzeros,
    cost_bounded_budget,
    resolve_shapes,
)

__all__ = [
    "Factorization",
    "PALMSettings",
    "Strategy",
    "candidate_splits",
    "fit_psm",
    "hierarchical_factorization",
    "largest_entries_mask",
    "project",
]


def fit_psm(
    matrix: object,
    budget: int,
    *,
    factor_shapes: Sequence[Sequence[int]] | None = None,
    nnz_split: Sequence[float] | None = None,
    nonzeros: Sequence[int] | None = None,
    seed: int = 0,
    settings: PALMSettings | None = None,
    block_size: int = 1,
    max_cost_ratio: float | None = None,
) -> Factorization:
    """Approximate ``matrix`` by a product of sparse factors holding at most ``budget``
    values in all (with ``block_size > 1``: supports made of dense ``block_size x
    block_size`` blocks, which must tile every factor).

    The search first runs three modes with equal nonzeros per factor: (global projection,
    left to right, continuation 2), (row/column projection, right to left, no continuation:
    the published setting that recovers butterfly matrices such as Hadamard's) and (global,
    left to right, no continuation); then the best mode with the other splits of
    :func:`candidate_splits` (unless ``nnz_split`` or ``nonzeros`` fixes the split), unless
    the first two modes show a target no sparse product fits closely
    (``settings.unstructured_error``): then the best of them is refined with a smaller work
    budget (``settings.unstructured_share``). The best
    run is refined with the sweeps left, its first and last factors' values are solved
    exactly on their supports, and supports left short of their nonzeros are filled (with
    zeros) where the gradient is largest. The search stops as soon as a run is exact. Fewer
    candidates are tried when the budget cannot give each ``settings.min_round_sweeps``
    sweeps per PALM run (the first two modes always run).

    Args:
        matrix: ``(rows, cols)`` array or tensor.
        budget: the most stored values, shared between the factors by the search (each
            factor gets at least ``max(rows, cols)``).
        factor_shapes: ``[rows, cols]`` of each factor, chained from ``rows`` to ``cols``;
            default two factors with inner dimension ``min(rows, cols)``.
        nnz_split: fix the split (relative weights per factor) instead of searching it.
        nonzeros: fix each factor's nonzeros (at most ``budget`` in all).
        seed: seeds the power iterations' start vectors and the tie-breaking priorities
            (the only randomness).
        settings: the work budget, search options and threads (:class:`PALMSettings`).
        block_size: side of the dense blocks the supports are made of.
        max_cost_ratio: bound on the forward+backward multiply-adds against the dense
            layer's (:func:`~structurednets_psm.layout.factor_costs`); every candidate then
            holds at most that share of ``rows * cols`` values. ``ValueError`` (naming the
            smallest achievable ratio) when no support fits it, or when ``nonzeros`` exceed it.

    Returns:
        The best :class:`Factorization` found (float64 factors on the CPU).
    """
    shape = tuple(getattr(matrix, "shape", ()))
    if len(shape) != 2:
        raise ValueError(
            f"matrix must be a 2-D array or tensor (rows x cols), got {type(matrix).__name__} "
            f"of shape {shape}"
        )
    rows, cols = int(shape[0]), int(shape[1])
    target = as_matrix("matrix", matrix, rows, cols, "rows x cols")
    budget = check_positive_int("budget", budget)
    # W = S_1 ... S_J is (rows x cols): the "input" side has cols, the "output" side rows
    shapes = resolve_shapes(cols, rows, factor_shapes=factor_shapes)
    block = check_block_size(block_size, shapes)
    weights = check_nnz_split(nnz_split, len(shapes))
    counts = None if nonzeros is None else check_nonzeros(nonzeros, shapes, block)
    bound = check_max_cost_ratio(max_cost_ratio)
    budget = cost_bounded_budget(budget, shapes, block, bound)
    if counts is not None and bound is not None and sum(counts) > budget:
        raise ValueError(
            f"nonzeros {list(counts)} cost {sum(counts) / (rows * cols):.6g} times the dense "
            f"layer, above max_cost_ratio={bound!r}; give fewer nonzeros"
        )
    if counts is not None and weights is not None:
        raise ValueError("pass either nonzeros or nnz_split, not both")
    if counts is not None and sum(counts) > budget:
        raise ValueError(f"nonzeros must hold at most budget={budget} in all, got {sum(counts)}")
    settings = settings or PALMSettings()
    if not isinstance(settings, PALMSettings):
        raise TypeError(
            f"settings must be a structurednets_psm.PALMSettings, got {type(settings).__name__}"
        )
    with torch_threads(settings.threads):
        return run_search(
            target,
            shapes,
            budget,
            nnz_split=weights,
            nonzeros=counts,
            seed=seed,
            settings=settings,
            block=block,
        )
