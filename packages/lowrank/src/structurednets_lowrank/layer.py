"""Low-rank layer: ``W = L @ R``."""

from __future__ import annotations

import torch
from torch import nn

from structurednets.calibration import InputStatistics, check_input_statistics
from structurednets.plugin import Cost, Layout, StructuredLayer, as_matrix, dense_init_std
from structurednets_lowrank.fit import fit_lowrank
from structurednets_lowrank.layout import factor_rank, layer_rank, lowrank_cost

__all__ = ["LRLayer"]


class LRLayer(StructuredLayer):
    """Low-rank layer: ``W = L @ R`` with ``L`` (output_dim x rank) and ``R`` (rank x input_dim).

    Forward and backward cost ``O(batch * rank * (input_dim + output_dim))``.

    Args:
        input_dim, output_dim, nb_params_share, use_bias, initial_weight_matrix, initial_bias:
            as for every :class:`~structurednets.StructuredLayer`. ``initial_weight_matrix`` is
            approximated by its truncated SVD, the best approximation of that rank in the
            Frobenius and spectral norms.
        input_statistics: an :class:`~structurednets.calibration.InputStatistics` of the
            inputs the layer will see; ``initial_weight_matrix`` is then fitted in the output
            error instead: the truncated SVD of the whitened ``W S`` mapped back by ``S^{-1}``,
            the exact optimum over rank ``rank`` of ``||(W - L R) S||_F`` (``S S = C + lambda I``).
        rank: the rank; by default the largest the budget allows,
            ``floor(nb_params_share * input_dim * output_dim / (input_dim + output_dim))``.
        factors: ``(L, R)`` to start from (arrays or tensors); their rank is the layer's rank.
        max_cost_ratio: caps the default rank so that forward plus backward multiply-adds stay
            within this share of ``nn.Linear``'s (for low rank the same share as the weights).

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
    #: The constructor's ``input_statistics=`` fit is the weighted optimum (no refinement).
    input_weighting = "optimal"
    accepts_max_cost_ratio = True

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
        input_statistics: InputStatistics | None = None,
        max_cost_ratio: float | None = None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, initial_bias)
        target = self.checked_weight_matrix(initial_weight_matrix)
        check_input_statistics(input_statistics, self.input_dim, target)
        if factors is not None:
            if target is not None:
                raise ValueError("pass either initial_weight_matrix or factors, not both")
            given_rank = factor_rank(factors)
            if rank is not None and rank != given_rank:
                raise ValueError(f"rank={rank!r} disagrees with the rank of factors ({given_rank})")
            rank = given_rank
        self.rank = layer_rank(
            self.input_dim, self.output_dim, self.nb_params_share, rank, max_cost_ratio
        )
        dtype = torch.get_default_dtype()
        if factors is not None:
            left = as_matrix(
                "factors[0] (L)", factors[0], self.output_dim, self.rank, "output_dim x rank"
            )
            right = as_matrix(
                "factors[1] (R)", factors[1], self.rank, self.input_dim, "rank x input_dim"
            )
        elif target is not None:
            left, right = fit_lowrank(target, self.rank, input_statistics)
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
    def error_curve(
        cls, matrix: torch.Tensor, input_statistics: InputStatistics | None, max_weights: int
    ) -> list[tuple[int, float]]:
        """Every rank's squared relative error from one SVD (Eckart-Young on the whitened
        ``W S`` with statistics, on ``W`` without): rank ``r`` holds ``r * (in + out)``
        weights and leaves the singular values after the ``r``-th."""
        output_dim, input_dim = matrix.shape
        if input_statistics is not None:
            matrix = matrix @ input_statistics.whitening_factor().to(matrix)
        energies = torch.linalg.svdvals(matrix).pow(2)
        total = float(energies.sum())
        if total == 0:
            return [(input_dim + output_dim, 0.0)]
        tails = (total - torch.cumsum(energies, 0)).clamp_min(0) / total
        per_rank = input_dim + output_dim
        ranks = range(1, min(len(energies), max_weights // per_rank) + 1)
        return [(rank * per_rank, float(tails[rank - 1])) for rank in ranks]

    @classmethod
    def layout_cost(cls, layout: Layout, batch_size: int) -> Cost:
        return lowrank_cost(layout, batch_size)

    def multiply(self, U: torch.Tensor) -> torch.Tensor:
        return (U @ self.right.T) @ self.left.T

    def to_dense(self) -> torch.Tensor:
        return self.left @ self.right

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
