"""Low-rank layer: ``W = L @ R``."""

from __future__ import annotations

import torch
from torch import nn

from structurednets.plugin import (
    BudgetTooSmallError,
    Cost,
    Layout,
    StructuredLayer,
    as_matrix,
    check_positive_int,
    dense_init_std,
    weight_budget,
)

__all__ = ["LRLayer", "lowrank_nb_weight_parameters", "plan_rank"]


def plan_rank(
    input_dim: int, output_dim: int, nb_params_share: float, rank: int | None = None
) -> int:
    """The rank of a low-rank layer: ``rank`` if given and within budget, else the largest
    rank whose ``rank * (input_dim + output_dim)`` scalars fit the budget."""
    budget = weight_budget(input_dim, output_dim, nb_params_share)
    per_rank = input_dim + output_dim
    if rank is None:
        if budget < per_rank:
            raise BudgetTooSmallError(
                "lowrank", input_dim, output_dim, nb_params_share, per_rank, "rank 1"
            )
        return budget // per_rank
    rank = check_positive_int("rank", rank)
    if rank * per_rank > budget:
        raise BudgetTooSmallError(
            "lowrank", input_dim, output_dim, nb_params_share, rank * per_rank, f"rank {rank}"
        )
    return rank


def lowrank_nb_weight_parameters(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    rank: int | None = None,
    factors: tuple[object, object] | None = None,
) -> int:
    """Weight scalars of an :class:`LRLayer` built with these arguments: ``rank * (in + out)``."""
    if factors is not None:
        rank = _factor_rank(factors)
    return plan_rank(input_dim, output_dim, nb_params_share, rank) * (input_dim + output_dim)


def _factor_rank(factors: object) -> int:
    if not isinstance(factors, (tuple, list)) or len(factors) != 2:
        raise TypeError(
            "factors must be a pair (L, R) with L of shape (output_dim, rank) and R of "
            f"shape (rank, input_dim), got {type(factors).__name__}"
        )
    left = factors[0]
    if not hasattr(left, "shape") or len(left.shape) != 2:
        raise TypeError(f"factors[0] (L) must be a 2-D array or tensor, got {type(left).__name__}")
    return int(left.shape[1])


class LRLayer(StructuredLayer):
    """Low-rank layer: ``W = L @ R`` with ``L`` (output_dim x rank) and ``R`` (rank x input_dim).

    Forward and backward cost ``O(batch * rank * (input_dim + output_dim))``.

    Args:
        input_dim, output_dim, nb_params_share, use_bias, initial_weight_matrix, initial_bias:
            as for every :class:`~structurednets.StructuredLayer`. ``initial_weight_matrix`` is
            approximated by its truncated SVD, the best approximation of that rank in the
            Frobenius and spectral norms.
        rank: the rank; by default the largest the budget allows,
            ``floor(nb_params_share * input_dim * output_dim / (input_dim + output_dim))``.
        factors: ``(L, R)`` to start from (arrays or tensors); their rank is the layer's rank.

    Shape:
        input ``(..., input_dim)``, output ``(..., output_dim)``.

    Attributes:
        left: ``L``, shape ``(output_dim, rank)``.
        right: ``R``, shape ``(rank, input_dim)``.
        rank: the rank; ``layout.sizes == {"rank": rank}``.

    Example:
        >>> layer = LRLayer(512, 256, nb_params_share=0.1)
        >>> layer.rank
        17
        >>> layer(torch.randn(8, 512)).shape
        torch.Size([8, 256])
    """

    structure_name = "lowrank"

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        nb_params_share: float,
        use_bias: bool = True,
        initial_weight_matrix: object = None,
        initial_bias: object = None,
        *,
        rank: int | None = None,
        factors: tuple[object, object] | None = None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, initial_bias)
        target = self.checked_weight_matrix(initial_weight_matrix)
        if factors is not None:
            if target is not None:
                raise ValueError("pass either initial_weight_matrix or factors, not both")
            factor_rank = _factor_rank(factors)
            if rank is not None and rank != factor_rank:
                raise ValueError(
                    f"rank={rank!r} disagrees with the rank of factors ({factor_rank})"
                )
            rank = factor_rank
        self.rank = plan_rank(self.input_dim, self.output_dim, self.nb_params_share, rank)
        dtype = torch.get_default_dtype()
        if factors is not None:
            left = as_matrix(
                "factors[0] (L)", factors[0], self.output_dim, self.rank, "output_dim x rank"
            )
            right = as_matrix(
                "factors[1] (R)", factors[1], self.rank, self.input_dim, "rank x input_dim"
            )
        elif target is not None:
            left, right = truncated_svd_factors(target, self.rank)
        else:
            # Entries of L and R ~ N(0, s^2) with rank * s^4 = std^2 give W entries of std.
            scale = (dense_init_std(self.input_dim) ** 2 / self.rank) ** 0.25
            left = torch.randn(self.output_dim, self.rank, dtype=torch.float64) * scale
            right = torch.randn(self.rank, self.input_dim, dtype=torch.float64) * scale
        self.left = nn.Parameter(left.to(dtype))
        self.right = nn.Parameter(right.to(dtype))

    def layout_sizes(self) -> dict[str, object]:
        return {"rank": self.rank}

    @classmethod
    def layout_cost(cls, layout: Layout, batch_size: int) -> Cost:
        """``b r (in + out)`` forward (``U R^T``, then ``L``); backward twice that
        (``dY L`` and ``dL``, then ``dU`` and ``dR``)."""
        per_sample = layout.sizes["rank"] * (layout.input_dim + layout.output_dim)
        return Cost(batch_size * per_sample, 2 * batch_size * per_sample)

    def multiply(self, U: torch.Tensor) -> torch.Tensor:
        return (U @ self.right.T) @ self.left.T

    def to_dense(self) -> torch.Tensor:
        return self.left @ self.right

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


def truncated_svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L @ R`` the best rank-``rank`` approximation of ``matrix``.

    The singular values are split evenly (``L = U sqrt(S)``, ``R = sqrt(S) V^T``) so that both
    factors have the same scale, which keeps gradient steps balanced. Ranks above
    ``min(matrix.shape)`` are padded with zero columns/rows.
    """
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = min(rank, S.numel())
    root = S[:keep].sqrt()
    left = torch.zeros(matrix.shape[0], rank, dtype=matrix.dtype)
    right = torch.zeros(rank, matrix.shape[1], dtype=matrix.dtype)
    left[:, :keep] = U[:, :keep] * root
    right[:keep] = root[:, None] * Vh[:keep]
    return left, right
