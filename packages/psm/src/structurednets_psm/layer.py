"""PSM layer: ``W = S_1 S_2 ... S_J``, each factor sparse with a fixed support."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from structurednets import StructuredLayer
from structurednets.calibration import InputStatistics
from structurednets.layers.structured_layer import dense_init_std
from structurednets.validation import BudgetTooSmallError, weight_budget
from structurednets_psm.factors import (
    BlockSparseFactor,
    SparseFactor,
    as_coordinates,
    random_support,
)
from structurednets_psm.palm import Factorization, PALMSettings, factorize
from structurednets_psm.plan import (
    PSMPlan,
    block_shapes,
    check_block_size,
    check_nnz_split,
    factor_shapes,
    plan_psm,
    smallest_nonzeros,
)
from structurednets_psm.weighted import weighted_factorization

__all__ = ["PSMLayer", "psm_nb_weight_parameters"]


def psm_nb_weight_parameters(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    nb_matrices: int = 2,
    nnz_split: Sequence[float] | None = None,
    inner_dim: int | None = None,
    factors: Sequence[object] | None = None,
    seed: int = 0,
    palm_settings: PALMSettings | None = None,
    block_size: int = 1,
) -> int:
    """Stored values of a :class:`PSMLayer` built with these arguments and no
    ``initial_weight_matrix``: the whole budget shared between the factors (in whole blocks),
    or the nonzeros of the given ``factors``."""
    if factors is not None:
        _refuse_blocks_with_factors(block_size)
        plan = _plan_from_factors(input_dim, output_dim, nb_params_share, factors, inner_dim)[0]
        return plan.total_nonzeros
    plan = plan_psm(
        input_dim,
        output_dim,
        nb_params_share,
        nb_matrices=nb_matrices,
        inner_dim=inner_dim,
        nnz_split=nnz_split,
        block_size=block_size,
    )
    return plan.total_nonzeros


def _refuse_blocks_with_factors(block_size: object) -> None:
    if block_size != 1:
        raise ValueError(
            f"block_size={block_size!r} cannot be combined with factors (given factors are "
            "element-sparse); leave block_size=1"
        )


def _plan_from_factors(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    factors: object,
    inner_dim: int | None,
) -> tuple[PSMPlan, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or not factors:
        raise TypeError(
            "factors must be a non-empty list of sparse factors S_1, ..., S_J (W = S_1 ... S_J; "
            f"scipy sparse matrices, torch sparse tensors or (indices, values) pairs), got {factors!r}"
        )
    expected = factor_shapes(input_dim, output_dim, len(factors), inner_dim)
    shapes, coordinates = [], []
    previous_cols = output_dim
    for j, factor in enumerate(factors):
        is_pair = isinstance(factor, (tuple, list))
        shape, rows, cols, values = as_coordinates(
            f"factors[{j}]", factor, expected[j] if is_pair else None
        )
        if shape[0] != previous_cols:
            raise ValueError(
                f"factors[{j}] must have {previous_cols} rows to chain "
                f"(W = S_1 ... S_J is output_dim x input_dim), got shape {shape}"
            )
        previous_cols = shape[1]
        shapes.append(shape)
        coordinates.append((rows, cols, values))
    if previous_cols != input_dim:
        raise ValueError(
            f"factors[-1] must have input_dim={input_dim} columns, got shape {shapes[-1]}"
        )
    nonzeros = tuple(rows.numel() for rows, _, _ in coordinates)
    needed = sum(nonzeros)
    if needed > weight_budget(input_dim, output_dim, nb_params_share):
        raise BudgetTooSmallError(
            "psm", input_dim, output_dim, nb_params_share, needed, "the given factors"
        )
    return PSMPlan(tuple(shapes), nonzeros), coordinates


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
            approximated by hierarchical PALM (:func:`structurednets_psm.factorize`), which
            also searches the split of the nonzeros unless ``nnz_split`` is given.
        nb_matrices: ``J``, the number of sparse factors.
        nnz_split: relative share of the nonzeros of each factor (``J`` positive numbers);
            default equal for a random layer, searched when fitting a matrix.
        inner_dim: the inner dimensions (all equal); default ``min(input_dim, output_dim)``.
        factors: ``S_1, ..., S_J`` to start from: scipy sparse matrices, torch sparse
            tensors, or ``(indices, values)`` pairs with ``indices`` of shape ``(2, nnz)``
            (pairs take the shapes implied by the dims and ``inner_dim``). Their supports
            and values are used as given.
        seed: seed of the approximator's random numbers (power-iteration start vectors and
            tie-breaking priorities); a random layer draws from torch's global generator, as
            ``nn.Linear``.
        palm_settings: work budget and search options of the approximator.
        block_size: ``b > 1`` makes every support a set of dense ``b x b`` blocks (``b``
            must divide the input, output and inner dimensions); the products then run as
            batched dense block products (``torch.bmm``), about twice as fast as the
            element-sparse kernels at the same number of values, at some cost in accuracy
            when fitting a matrix.
        input_statistics: an :class:`~structurednets.calibration.InputStatistics` of the
            layer's inputs: the weight fit is then refitted in the output error by PALM with
            the whitening factor as a fixed last factor
            (:func:`structurednets_psm.weighted.weighted_factorization`).

    Attributes:
        factors: ``nn.ModuleList`` of :class:`SparseFactor`, ``S_1`` first (output side).
        fit: the :class:`~structurednets_psm.palm.Factorization` when fitted to a matrix,
            else ``None``.

    Example:
        >>> layer = PSMLayer(512, 256, nb_params_share=0.1)
        >>> [f.nnz for f in layer.factors]
        [6554, 6553]
        >>> layer(torch.randn(8, 512)).shape
        torch.Size([8, 256])
    """

    structure_name = "psm"
    #: The constructor's ``input_statistics=`` fit works in the output error (PALM with the
    #: whitening factor as a fixed extra factor); core's refinement follows it.
    input_weighting = "weighted"

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        nb_params_share: float,
        use_bias: bool = True,
        initial_weight_matrix: object = None,
        initial_bias: object = None,
        *,
        nb_matrices: int = 2,
        nnz_split: Sequence[float] | None = None,
        inner_dim: int | None = None,
        factors: Sequence[object] | None = None,
        seed: int = 0,
        palm_settings: PALMSettings | None = None,
        block_size: int = 1,
        input_statistics: InputStatistics | None = None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, initial_bias)
        target = self.checked_weight_matrix(initial_weight_matrix)
        if input_statistics is not None:
            if not isinstance(input_statistics, InputStatistics):
                raise TypeError(
                    "input_statistics must be a structurednets.calibration.InputStatistics, "
                    f"got {type(input_statistics).__name__}"
                )
            if input_statistics.input_dim != self.input_dim or target is None:
                raise ValueError(
                    "input_statistics needs an initial_weight_matrix and statistics of "
                    f"input_dim={self.input_dim}, got {input_statistics!r}"
                )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TypeError(f"seed must be a non-negative integer, got {seed!r}")
        if palm_settings is not None and not isinstance(palm_settings, PALMSettings):
            raise TypeError(
                f"palm_settings must be a structurednets_psm.PALMSettings, got {palm_settings!r}"
            )
        self.fit: Factorization | None = None
        if factors is not None:
            if target is not None:
                raise ValueError("pass either initial_weight_matrix or factors, not both")
            _refuse_blocks_with_factors(block_size)
            plan, coordinates = _plan_from_factors(
                self.input_dim, self.output_dim, self.nb_params_share, factors, inner_dim
            )
            modules = [
                SparseFactor(rows, cols, *coords)
                for (rows, cols), coords in zip(plan.shapes, coordinates, strict=True)
            ]
        elif target is not None:
            shapes = factor_shapes(self.input_dim, self.output_dim, nb_matrices, inner_dim)
            weights = check_nnz_split(nnz_split, len(shapes))
            block = check_block_size(block_size, shapes)
            needed = sum(smallest_nonzeros(block_shapes(shapes, block))) * block * block
            self.require_budget(
                needed, f"{len(shapes)} sparse factor(s) with a nonzero in every row and column"
            )
            self.fit = factorize(
                target,
                shapes,
                self.weight_budget,
                nnz_split=weights,
                seed=seed,
                settings=palm_settings,
                block_size=block,
            )
            if input_statistics is not None:
                self.fit = weighted_factorization(self.fit, target, input_statistics, block=block)
            modules = [
                _factor_from_fit(rows, cols, block, matrix, support)
                for (rows, cols), matrix, support in zip(
                    shapes, self.fit.factors, self.fit.supports, strict=True
                )
            ]
        else:
            plan = plan_psm(
                self.input_dim,
                self.output_dim,
                self.nb_params_share,
                nb_matrices=nb_matrices,
                inner_dim=inner_dim,
                nnz_split=nnz_split,
                block_size=block_size,
            )
            modules = _random_factors(plan, dense_init_std(self.input_dim))
        self.factors = nn.ModuleList(modules)

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


def _random_factors(plan: PSMPlan, std: float) -> list[SparseFactor | BlockSparseFactor]:
    """Random supports touching every row and column (of blocks); Gaussian values of one
    common scale so that the entries of the product have deviation ``std``.

    With independent supports of densities ``p_j``, inner dimensions ``d_j`` and values of
    variance ``s^2``, an entry of the product has variance
    ``prod_j (p_j s^2) * prod_{j<J} d_j`` (also for block supports, ``p_j`` their density).
    """
    log_gain = 0.0
    for j, ((rows, cols), nnz) in enumerate(zip(plan.shapes, plan.nonzeros, strict=True)):
        log_gain += math.log(nnz / (rows * cols))
        if j < len(plan.shapes) - 1:
            log_gain += math.log(cols)
    scale = math.exp((2 * math.log(std) - log_gain) / (2 * len(plan.shapes)))
    b = plan.block_size
    modules: list[SparseFactor | BlockSparseFactor] = []
    for (rows, cols), nnz in zip(plan.shapes, plan.nonzeros, strict=True):
        nb_blocks = nnz // (b * b)
        block_rows, block_cols = random_support(rows // b, cols // b, nb_blocks)
        if b == 1:
            values = torch.randn(nnz, dtype=torch.float64) * scale
            modules.append(SparseFactor(rows, cols, block_rows, block_cols, values))
        else:
            values = torch.randn(nb_blocks, b, b, dtype=torch.float64) * scale
            modules.append(BlockSparseFactor(rows, cols, b, block_rows, block_cols, values))
    return modules
