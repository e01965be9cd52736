"""The sizes of an LDR layer: displacement rank and Krylov columns, and its parameter count.

The operators ``A`` and ``B`` always have their three periodic bands (``3 (in + out)``
scalars) and ``G``, ``H`` have ``r`` columns, so ``layer.layout.sizes`` is
``{"displacement_rank": r, "krylov_columns": m}``: with them the constructor rebuilds every
parameter's shape. (How a product is evaluated, the *schedule*, follows from these sizes and
the batch size: :mod:`structurednets_ldr.schedule`.)
"""

from __future__ import annotations

from structurednets.plugin import (
    BudgetTooSmallError,
    check_positive_int,
    largest_count_within,
    weight_budget,
)

__all__ = ["displacement_rank_for", "generator_rank", "ldr_nb_weight_parameters"]


def displacement_rank_for(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    displacement_rank: int | None = None,
) -> int:
    """The displacement rank ``r`` of an LDR layer: ``displacement_rank`` if given and within
    budget, else the largest ``r`` whose ``(r + 3) (input_dim + output_dim)`` scalars fit.

    The ``3 (input_dim + output_dim)`` are the nonzeros of the operators ``A`` and ``B``.
    Raises :class:`~structurednets.BudgetTooSmallError` naming the smallest share that fits.
    """
    budget = weight_budget(input_dim, output_dim, nb_params_share)
    per_rank = input_dim + output_dim
    if displacement_rank is None:
        rank = largest_count_within(budget, per_rank, fixed=3 * per_rank)
        if rank < 1:
            raise BudgetTooSmallError(
                "ldr",
                input_dim,
                output_dim,
                nb_params_share,
                4 * per_rank,
                "displacement rank 1 (operators A, B and generators G, H)",
            )
        return rank
    rank = check_positive_int("displacement_rank", displacement_rank)
    if (rank + 3) * per_rank > budget:
        raise BudgetTooSmallError(
            "ldr",
            input_dim,
            output_dim,
            nb_params_share,
            (rank + 3) * per_rank,
            f"displacement rank {rank} (operators A, B and generators G, H)",
        )
    return rank


def generator_rank(generators: object) -> int:
    """The displacement rank of ``generators = (G, H)``: the columns of ``G``."""
    if not isinstance(generators, (tuple, list)) or len(generators) != 2:
        raise TypeError(
            "generators must be a pair (G, H) with G of shape (output_dim, r) and H of shape "
            f"(input_dim, r), got {type(generators).__name__}"
        )
    first = generators[0]
    if not hasattr(first, "shape") or len(first.shape) != 2:
        raise TypeError(
            f"generators[0] (G) must be a 2-D array or tensor, got {type(first).__name__}"
        )
    return int(first.shape[1])


def ldr_nb_weight_parameters(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    displacement_rank: int | None = None,
    generators: tuple[object, object] | None = None,
    krylov_columns: int | None = None,
    operators: tuple[object, object] | None = None,
    fit_max_evaluations: int = 400,
    fit_max_seconds: float = 50.0,
    cache_weight: bool = False,
    max_cost_ratio: float | None = None,
) -> int:
    """Weight scalars of an :class:`~structurednets_ldr.LDRLayer` built with these arguments
    (its layout sizes among them): ``(r + 3) (input_dim + output_dim)``.

    ``krylov_columns``, ``operators``, the fitting options and ``cache_weight`` do not change
    the count; ``max_cost_ratio`` is ignored here (it can only lower the displacement rank
    the constructor takes, see :func:`~structurednets_ldr.cost.rank_within_cost`).
    """
    if generators is not None:
        displacement_rank = generator_rank(generators)
    rank = displacement_rank_for(input_dim, output_dim, nb_params_share, displacement_rank)
    return (rank + 3) * (input_dim + output_dim)
