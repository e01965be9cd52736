"""Sizes, parameter count and cost of a low-rank layer: everything follows from its rank."""

from __future__ import annotations

from structurednets.plugin import (
    BudgetTooSmallError,
    Cost,
    Layout,
    check_positive_int,
    largest_count_within,
    weight_budget,
)

__all__ = ["factor_rank", "layer_rank", "lowrank_cost", "lowrank_nb_weight_parameters"]


def layer_rank(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    rank: int | None = None,
    max_cost_ratio: float | None = None,
) -> int:
    """The rank of a low-rank layer: ``rank`` if given, else the largest rank whose
    ``rank * (input_dim + output_dim)`` scalars fit the budget. With ``max_cost_ratio``, the
    rank's multiply-adds ``rank * (in + out)`` per sample must also stay within that share of
    a dense layer's ``in * out`` (the chosen rank is capped; a given one is checked)."""
    budget = weight_budget(input_dim, output_dim, nb_params_share)
    per_rank = input_dim + output_dim
    given = rank is not None
    if rank is None:
        rank = largest_count_within(budget, per_rank)
        if rank == 0:
            raise BudgetTooSmallError(
                "lowrank", input_dim, output_dim, nb_params_share, per_rank, "rank 1"
            )
    else:
        rank = check_positive_int("rank", rank)
        if rank * per_rank > budget:
            raise BudgetTooSmallError(
                "lowrank", input_dim, output_dim, nb_params_share, rank * per_rank, f"rank {rank}"
            )
    if max_cost_ratio is None:
        return rank
    within = largest_count_within(int(max_cost_ratio * input_dim * output_dim), per_rank)
    if within == 0:
        raise ValueError(
            f"max_cost_ratio must be at least {per_rank / (input_dim * output_dim):.3g} for a "
            f"rank-1 lowrank layer of {output_dim} x {input_dim}, got {max_cost_ratio!r}"
        )
    if given and rank > within:
        raise ValueError(
            f"rank={rank} costs {rank * per_rank / (input_dim * output_dim):.3g}x the "
            f"multiply-adds of nn.Linear, over max_cost_ratio={max_cost_ratio!r}; the largest "
            f"rank within it is {within}"
        )
    return min(rank, within)


def lowrank_nb_weight_parameters(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    rank: int | None = None,
    factors: tuple[object, object] | None = None,
    max_cost_ratio: float | None = None,
) -> int:
    """Weight scalars of an :class:`LRLayer` built with these arguments: ``rank * (in + out)``."""
    if factors is not None:
        rank = factor_rank(factors)
    chosen = layer_rank(input_dim, output_dim, nb_params_share, rank, max_cost_ratio)
    return chosen * (input_dim + output_dim)


def lowrank_cost(layout: Layout, batch_size: int) -> Cost:
    """``b r (in + out)`` multiply-adds forward (``U R^T``, then ``L``); backward twice that
    (``dY L`` and ``dL``, then ``dU`` and ``dR``)."""
    per_sample = layout.sizes["rank"] * (layout.input_dim + layout.output_dim)
    return Cost(batch_size * per_sample, 2 * batch_size * per_sample)


def factor_rank(factors: object) -> int:
    """The rank of given factors ``(L, R)``, checked to be a pair of 2-D arrays."""
    if not isinstance(factors, (tuple, list)) or len(factors) != 2:
        raise TypeError(
            "factors must be a pair (L, R) with L of shape (output_dim, rank) and R of "
            f"shape (rank, input_dim), got {type(factors).__name__}"
        )
    left = factors[0]
    if not hasattr(left, "shape") or len(left.shape) != 2:
        raise TypeError(f"factors[0] (L) must be a 2-D array or tensor, got {type(left).__name__}")
    return int(left.shape[1])
