"""Monarch layer: ``W = L P R``, two block-diagonal factors with a fixed permutation between."""

from __future__ import annotations

import torch
from torch import nn

from structurednets.plugin import Cost, Layout, StructuredLayer, dense_init_std
from structurednets_monarch.fit import MonarchFactors, fit_monarch
from structurednets_monarch.kernels import monarch_dense, monarch_multiply
from structurednets_monarch.layout import MonarchShape, plan_monarch

__all__ = ["MonarchLayer"]


class MonarchLayer(StructuredLayer):
    """Monarch layer (Dao et al., ICML 2022) with a rank per block pair.

    The columns of ``W`` (output_dim x input_dim) split into ``k`` input blocks, its rows into
    ``q`` output groups; every block pair ``W[rows of s, cols of j]`` has rank at most ``r``.
    ``W = L P R`` with ``R`` block-diagonal (``k`` blocks of ``(q r) x p``), ``P`` a fixed
    permutation and ``L`` block-diagonal (``q`` blocks of ``l x (k r)``):
    ``r * (q * input_dim + k * output_dim)`` weight scalars, and as many multiply-adds per
    sample in forward (two ``torch.bmm`` over the blocks). Sizes that do not divide evenly give
    blocks of two sizes that differ by one.

    Args:
        input_dim, output_dim, nb_params_share, use_bias, initial_weight_matrix, initial_bias:
            as for every :class:`~structurednets.StructuredLayer`. ``initial_weight_matrix`` is
            projected onto the nearest Monarch matrix (a truncated SVD per block pair); without
            ``nb_blocks``, every power-of-two block count is compared and the best kept.
        nb_blocks: ``k`` for both sides or ``(k, q)``: input blocks and output groups. Default:
            about ``sqrt(dim)`` per side, as in the classic Monarch layer, among powers of two
            whose layout uses the budget well (see :func:`~structurednets_monarch.plan_monarch`).
        rank: rank per block pair, at most the smaller side of a block pair; by default the
            largest the budget allows.

    Shape:
        input ``(..., input_dim)``, output ``(..., output_dim)``.

    Attributes:
        monarch_shape: the :class:`~structurednets_monarch.MonarchShape` (block counts, rank).
        right: ``(k1, q r, p)``, the input blocks of ``p`` columns (``right_short``:
            ``(k - k1, q r, p - 1)`` when ``input_dim`` does not divide evenly).
        left: ``(q1, l, k r)``, the output groups of ``l`` rows (``left_short``:
            ``(q - q1, l - 1, k r)`` when ``output_dim`` does not divide evenly).

    Example:
        >>> layer = MonarchLayer(2048, 2048, nb_params_share=0.1)
        >>> layer.nb_blocks, layer.rank, layer.nb_weight_parameters
        ((32, 32), 3, 393216)
        >>> layer(torch.randn(8, 2048)).shape
        torch.Size([8, 2048])
    """

    structure_name = "monarch"

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        nb_params_share: float,
        use_bias: bool = True,
        initial_weight_matrix: object = None,
        initial_bias: object = None,
        *,
        nb_blocks: int | tuple[int, int] | None = None,
        rank: int | None = None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, initial_bias)
        target = self.checked_weight_matrix(initial_weight_matrix)
        dtype = torch.get_default_dtype()
        if target is None:
            shape = plan_monarch(
                self.input_dim, self.output_dim, self.nb_params_share, nb_blocks, rank
            )
            factors = _random_factors(shape, dense_init_std(self.input_dim))
        else:
            fit = fit_monarch(target, self.weight_budget, nb_blocks=nb_blocks, rank=rank)
            shape, factors = fit.shape, fit.factors
        self.monarch_shape = shape
        self.require_budget(shape.nb_weight_parameters, f"rank {shape.rank}")
        for name in ("right", "right_short", "left", "left_short"):
            value = getattr(factors, name)
            parameter = None if value is None else nn.Parameter(value.to(dtype))
            self.register_parameter(name, parameter)

    @property
    def nb_blocks(self) -> tuple[int, int]:
        """``(k, q)``: input blocks and output groups."""
        return self.monarch_shape.nb_input_blocks, self.monarch_shape.nb_output_blocks

    @property
    def rank(self) -> int:
        """The rank of each block pair."""
        return self.monarch_shape.rank

    def layout_sizes(self) -> dict[str, object]:
        """The keyword options that rebuild this layer's shape: ``nb_blocks`` and ``rank``."""
        return self.monarch_shape.sizes()

    @classmethod
    def layout_cost(cls, layout: Layout, batch_size: int) -> Cost:
        """``b r (q in + k out)`` forward (the two batched products); backward twice that
        (each product's input and factor gradients). The permuting copies are not counted."""
        k, q = layout.sizes["nb_blocks"]
        shape = MonarchShape(layout.input_dim, layout.output_dim, k, q, layout.sizes["rank"])
        forward = batch_size * shape.nb_weight_parameters
        return Cost(forward, 2 * forward)

    def multiply(self, U: torch.Tensor) -> torch.Tensor:
        return monarch_multiply(
            U, self.monarch_shape, self.right, self.right_short, self.left, self.left_short
        )

    def to_dense(self) -> torch.Tensor:
        return monarch_dense(
            self.monarch_shape, self.right, self.right_short, self.left, self.left_short
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nb_blocks={self.nb_blocks}, rank={self.rank}"


def _random_factors(shape: MonarchShape, std: float) -> MonarchFactors:
    """Gaussian factor blocks whose product has entries of deviation ``std``: each entry of
    ``W`` sums ``r`` products, so the factors' entries have ``(std^2 / r)^(1/4)``."""
    scale = (std**2 / shape.rank) ** 0.25
    k1, k2 = shape.nb_long_input_blocks, shape.nb_short_input_blocks
    q1, q2 = shape.nb_long_output_blocks, shape.nb_short_output_blocks
    width, height = shape.input_block_size, shape.output_block_size
    qr, kr = shape.nb_output_blocks * shape.rank, shape.nb_input_blocks * shape.rank

    def draw(*size: int) -> torch.Tensor:
        return torch.randn(*size, dtype=torch.float64) * scale

    return MonarchFactors(
        draw(k1, qr, width),
        draw(k2, qr, width - 1) if k2 else None,
        draw(q1, height, kr),
        draw(q2, height - 1, kr) if q2 else None,
    )
