"""PSM layer: ``W = S_1 S_2 ... S_J``, each factor sparse with a fixed support."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from structurednets.calibration import InputStatistics, check_input_statistics
from structurednets.cost import Cost
from structurednets.layout import Layout
from structurednets.plugin import StructuredLayer, dense_init_std
from structurednets_psm.factors import BlockSparseFactor, SparseFactor, random_support
from structurednets_psm.fit import Factorization, PALMSettings, fit_psm
from structurednets_psm.fit.weighted import weighted_factorization
from structurednets_psm.given_factors import check_factors_alone, sizes_of_factors
from structurednets_psm.layout import (
    FactorSizes,
    check_max_cost_ratio,
    check_size_options,
    factor_costs,
    layer_sizes,
)

__all__ = ["PSMLayer", "psm_nb_weight_parameters"]


def psm_nb_weight_parameters(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    nb_matrices: int | None = None,
    nnz_split: Sequence[float] | None = None,
    inner_dim: int | None = None,
    factor_shapes: object = None,
    nonzeros: object = None,
    factors: Sequence[object] | None = None,
    seed: int = 0,
    palm_settings: object = None,
    block_size: int = 1,
    max_cost_ratio: object = None,
) -> int:
    """Stored values of a :class:`~structurednets_psm.PSMLayer` built with these arguments
    and no ``initial_weight_matrix``: the given ``nonzeros``, the nonzeros of the given
    ``factors``, or the whole budget shared between the factors (in whole blocks).
    ``max_cost_ratio`` bounds fits only and is ignored here."""
    if factors is not None:
        check_factors_alone(
            factors,
            nb_matrices=nb_matrices,
            nnz_split=nnz_split,
            factor_shapes=factor_shapes,
            nonzeros=nonzeros,
            block_size=block_size,
        )
        return sizes_of_factors(input_dim, output_dim, nb_params_share, factors, inner_dim)[
            0
        ].total_nonzeros
    return layer_sizes(
        input_dim,
        output_dim,
        nb_params_share,
        nb_matrices=nb_matrices,
        inner_dim=inner_dim,
        factor_shapes=factor_shapes,
        nonzeros=nonzeros,
        nnz_split=nnz_split,
        block_size=block_size,
    ).total_nonzeros


class PSMLayer(StructuredLayer):
    """Product of sparse matrices: ``W = S_1 S_2 ... S_J``, each factor with a fixed support.

    Each factor keeps its support as CSR index buffers and its nonzero values as one dense
    ``nn.Parameter``, so any optimiser, ``state_dict``, DDP and ``torch.compile`` work. The
    forward pass multiplies by one sparse factor at a time (``torch.sparse`` CSR kernels,
    never a dense ``W``); the backward pass gives the input gradient through the transposed
    factors and the values' gradient as the output gradient times the input, sampled on the
    support. Forward and backward cost ``O(batch * (nonzeros of all factors))``.

    Args:
        input_dim, output_dim, nb_params_share, use_bias, initial_weight_matrix, initial_bias:
            as for every :class:`~structurednets.StructuredLayer`. ``initial_weight_matrix`` is
            approximated by hierarchical PALM (:func:`structurednets_psm.fit_psm`), which
            also searches the split of the nonzeros unless ``nnz_split`` is given.
        nb_matrices: ``J``, the number of sparse factors; default 2 (or the number of
            ``factor_shapes``).
        nnz_split: relative share of the nonzeros of each factor (``J`` positive numbers);
            default equal for a random layer, searched when fitting a matrix.
        inner_dim: the inner dimensions (all equal); default ``min(input_dim, output_dim)``.
        factor_shapes: ``[rows, cols]`` of each factor, chained from ``output_dim`` rows to
            ``input_dim`` columns (instead of ``nb_matrices`` and ``inner_dim``).
        nonzeros: the stored values of each factor (multiples of ``block_size**2``, at most
            the budget in all), instead of sharing the whole budget. With ``factor_shapes``
            and ``block_size`` these are the layer's ``layout.sizes``.
        factors: ``S_1, ..., S_J`` to start from: scipy sparse matrices, torch sparse
            tensors, or ``(indices, values)`` pairs with ``indices`` of shape ``(2, nnz)``
            (pairs take the shapes implied by the dims and ``inner_dim``). Their supports
            and values are used as given.
        seed: seed of the approximator's random numbers (power-iteration start vectors and
            tie-breaking priorities); a random layer draws from torch's global generator, as
            ``nn.Linear``.
        palm_settings: work budget and search options of the approximator.
        max_cost_ratio: when fitting a matrix, the most forward+backward multiply-adds
            against ``nn.Linear`` (``layer.cost_ratio()``; for PSM the share of ``input_dim *
            output_dim`` stored values): the fit then holds at most that many values.
            ``ValueError`` naming the smallest achievable ratio if none fits. A fit control,
            not part of the layout; ignored by a random layer.
        block_size: ``b > 1`` makes every support a set of dense ``b x b`` blocks (``b``
            must divide the input, output and inner dimensions); the products then run as
            batched dense block products (``torch.bmm``), about twice as fast as the
            element-sparse kernels at the same number of values, at some cost in accuracy
            when fitting a matrix.
        input_statistics: an :class:`~structurednets.calibration.InputStatistics` of the
            layer's inputs: the weight fit is then refitted in the output error by PALM with
            the whitening factor as a fixed last factor
            (:func:`structurednets_psm.fit.weighted.weighted_factorization`).

    Shape:
        input: ``(..., input_dim)``; output: ``(..., output_dim)``.

    Attributes:
        factors: ``nn.ModuleList`` of :class:`SparseFactor` (or :class:`BlockSparseFactor`),
            ``S_1`` first (output side); each holds its support as persistent integer
            buffers and its values as one parameter.
        sizes: the factors' shapes and nonzeros (:class:`~structurednets_psm.FactorSizes`).
        fit: the :class:`~structurednets_psm.Factorization` when fitted to a matrix, else
            ``None`` (not saved with the state dict).
        bias: the learnable ``(output_dim,)`` bias, or ``None``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> layer = PSMLayer(64, 32, nb_params_share=0.25)
        >>> layer.layout_sizes()
        {'factor_shapes': [[32, 32], [32, 64]], 'nonzeros': [256, 256], 'block_size': 1}
        >>> layer(torch.randn(8, 64)).shape
        torch.Size([8, 32])
        >>> twin = structurednets.create("psm", layout=layer.layout)  # random, same shapes
        >>> _ = twin.load_state_dict(layer.state_dict())  # supports and values
        >>> U = torch.randn(4, 64)
        >>> torch.equal(twin(U), layer(U))
        True
    """

    structure_name = "psm"
    #: The constructor's ``input_statistics=`` fit works in the output error (PALM with the
    #: whitening factor as a fixed extra factor); core's refinement follows it.
    input_weighting = "weighted"
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
        nb_matrices: int | None = None,
        nnz_split: Sequence[float] | None = None,
        inner_dim: int | None = None,
        factor_shapes: Sequence[Sequence[int]] | None = None,
        nonzeros: Sequence[int] | None = None,
        factors: Sequence[object] | None = None,
        seed: int = 0,
        palm_settings: PALMSettings | None = None,
        block_size: int = 1,
        input_statistics: InputStatistics | None = None,
        max_cost_ratio: float | None = None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, initial_bias)
        target = self.checked_weight_matrix(initial_weight_matrix)
        check_input_statistics(input_statistics, self.input_dim, target)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TypeError(f"seed must be a non-negative integer, got {seed!r}")
        if palm_settings is not None and not isinstance(palm_settings, PALMSettings):
            raise TypeError(
                f"palm_settings must be a structurednets_psm.PALMSettings, got {palm_settings!r}"
            )
        check_max_cost_ratio(max_cost_ratio)
        self.fit: Factorization | None = None
        size_options = {
            "nb_matrices": nb_matrices,
            "inner_dim": inner_dim,
            "factor_shapes": factor_shapes,
            "nonzeros": nonzeros,
            "nnz_split": nnz_split,
            "block_size": block_size,
        }
        share = self.nb_params_share
        if factors is not None:
            if target is not None:
                raise ValueError("pass either initial_weight_matrix or factors, not both")
            inner_dim = size_options.pop("inner_dim")  # shapes the (indices, values) pairs
            check_factors_alone(factors, **size_options)
            sizes, coordinates = sizes_of_factors(
                self.input_dim, self.output_dim, share, factors, inner_dim
            )
            modules = [
                SparseFactor(rows, cols, *coords)
                for (rows, cols), coords in zip(sizes.shapes, coordinates, strict=True)
            ]
        elif target is not None:
            checked = check_size_options(self.input_dim, self.output_dim, share, **size_options)
            self.fit = fit_psm(
                target,
                self.weight_budget,
                factor_shapes=checked.shapes,
                nnz_split=checked.nnz_split,
                nonzeros=checked.nonzeros,
                seed=seed,
                settings=palm_settings,
                block_size=checked.block_size,
                max_cost_ratio=max_cost_ratio,
            )
            if input_statistics is not None:
                self.fit = weighted_factorization(
                    self.fit, target, input_statistics, block=checked.block_size
                )
            modules = [
                _factor_from_fit(rows, cols, checked.block_size, matrix, support)
                for (rows, cols), matrix, support in zip(
                    checked.shapes, self.fit.factors, self.fit.supports, strict=True
                )
            ]
        else:
            sizes = layer_sizes(self.input_dim, self.output_dim, share, **size_options)
            modules = _random_factors(sizes, dense_init_std(self.input_dim))
        self.factors = nn.ModuleList(modules)

    def layout_sizes(self) -> dict[str, object]:
        """``factor_shapes`` (``[rows, cols]`` of each factor), ``nonzeros`` (stored values of
        each factor) and ``block_size``: options that rebuild exactly these factors."""
        return self.sizes.as_layout_sizes()

    @classmethod
    def layout_cost(cls, layout: Layout, batch_size: int) -> Cost:
        """``batch * nnz`` forward, ``2 * batch * nnz`` backward (``nnz``: stored values of
        all factors; see :func:`structurednets_psm.layout.factor_costs`)."""
        return factor_costs(_sizes_of_layout(layout), batch_size)

    @property
    def sizes(self) -> FactorSizes:
        """The factors' shapes and nonzeros (see :meth:`layout_sizes`)."""
        return FactorSizes(
            tuple((f.rows, f.cols) for f in self.factors),
            tuple(f.nnz for f in self.factors),
            self.block_size,
        )

    @property
    def nb_matrices(self) -> int:
        return len(self.factors)

    def multiply(self, U: torch.Tensor) -> torch.Tensor:
        # Activations are kept transposed, (features, batch), so that every step is a CSR
        # matrix times a dense matrix.
        values_dtype = self.factors[0].values.dtype
        Z = U.T if U.dtype == values_dtype else U.T.to(values_dtype)
        for factor in reversed(self.factors):
            Z = factor.matmul(Z)
        return Z.T

    def to_dense(self) -> torch.Tensor:
        W = self.factors[-1].to_dense()
        for factor in reversed(self.factors[:-1]):
            W = factor.matmul(W)
        return W

    def lr_multipliers(self) -> dict[str, float]:
        """Learning-rate factors for :func:`structurednets.param_groups`: every factor's values
        get ``sqrt(input_dim * output_dim / nb_weight_parameters)``, since Adam moves each of
        the few values by about the rate; one step then changes the outputs about as much as
        in ``nn.Linear`` at any share."""
        factor = (self.input_dim * self.output_dim / self.nb_weight_parameters) ** 0.5
        return {name: factor for name, _ in self.factors.named_parameters(prefix="factors")}

    @property
    def block_size(self) -> int:
        return getattr(self.factors[0], "block_size", 1)

    def extra_repr(self) -> str:
        shapes = " x ".join(f"({f.rows}x{f.cols})" for f in self.factors)
        nonzeros = ", ".join(str(f.nnz) for f in self.factors)
        blocks = f", block_size={self.block_size}" if self.block_size > 1 else ""
        return (
            f"{super().extra_repr()}, nb_matrices={self.nb_matrices}, factors={shapes}, "
            f"nnz=[{nonzeros}]{blocks}"
        )


def _sizes_of_layout(layout: Layout) -> FactorSizes:
    sizes = layout.sizes
    return FactorSizes(
        tuple((int(r), int(c)) for r, c in sizes["factor_shapes"]),
        tuple(int(n) for n in sizes["nonzeros"]),
        int(sizes.get("block_size", 1)),
    )


def _factor_from_fit(
    rows: int, cols: int, block: int, matrix: torch.Tensor, support: torch.Tensor
) -> SparseFactor | BlockSparseFactor:
    if block == 1:
        row_indices, col_indices = support.nonzero(as_tuple=True)
        return SparseFactor(rows, cols, row_indices, col_indices, matrix[support])
    grid = (rows // block, block, cols // block, block)
    block_rows, block_cols = support.reshape(grid)[:, 0, :, 0].nonzero(as_tuple=True)
    blocks = matrix.reshape(grid).permute(0, 2, 1, 3)[block_rows, block_cols]
    return BlockSparseFactor(rows, cols, block, block_rows, block_cols, blocks)


def _random_factors(sizes: FactorSizes, std: float) -> list[SparseFactor | BlockSparseFactor]:
    """Random supports touching every row and column (of blocks); Gaussian values of one
    common scale so that the entries of the product have deviation ``std``.

    With independent supports of densities ``p_j``, inner dimensions ``d_j`` and values of
    variance ``s^2``, an entry of the product has variance
    ``prod_j (p_j s^2) * prod_{j<J} d_j`` (also for block supports, ``p_j`` their density).
    """
    scale = 1.0  # a factor without values makes the product zero at any scale
    if all(sizes.nonzeros):
        log_gain = 0.0
        for j, ((rows, cols), nnz) in enumerate(zip(sizes.shapes, sizes.nonzeros, strict=True)):
            log_gain += math.log(nnz / (rows * cols))
            if j < len(sizes.shapes) - 1:
                log_gain += math.log(cols)
        scale = math.exp((2 * math.log(std) - log_gain) / (2 * len(sizes.shapes)))
    b = sizes.block_size
    modules: list[SparseFactor | BlockSparseFactor] = []
    for (rows, cols), nnz in zip(sizes.shapes, sizes.nonzeros, strict=True):
        nb_blocks = nnz // (b * b)
        block_rows, block_cols = random_support(rows // b, cols // b, nb_blocks)
        if b == 1:
            values = torch.randn(nnz, dtype=torch.float64) * scale
            modules.append(SparseFactor(rows, cols, block_rows, block_cols, values))
        else:
            values = torch.randn(nb_blocks, b, b, dtype=torch.float64) * scale
            modules.append(BlockSparseFactor(rows, cols, b, block_rows, block_cols, values))
    return modules
