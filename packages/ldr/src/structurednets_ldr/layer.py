"""Low displacement rank layer: ``W = sum_i K(A, g_i) K(B^T, h_i)^T``."""

from __future__ import annotations

import torch
from torch import nn

from structurednets.cost import Cost
from structurednets.plugin import (
    Layout,
    StructuredLayer,
    as_matrix,
    check_positive_int,
    dense_init_std,
)
from structurednets_ldr import kernels
from structurednets_ldr.cost import ldr_cost, rank_within_cost
from structurednets_ldr.fit import fit_ldr
from structurednets_ldr.layout import displacement_rank_for, generator_rank
from structurednets_ldr.operators import bands_from_dense, bands_to_dense, cyclic_shift_bands
from structurednets_ldr.schedule import choose_schedule, schedule_for, schedule_table

__all__ = ["LDRLayer"]


class LDRLayer(StructuredLayer):
    """Low displacement rank layer: ``W = sum_i K(A, g_i) K(B^T, h_i)^T`` (Thomas et al., 2018).

    ``K(M, v) = [v, M v, ..., M^(m-1) v]`` is a Krylov matrix with ``m`` columns; ``A``
    (output_dim square) and ``B`` (input_dim square) are tridiagonal plus the two corner
    entries, all of whose ``3 n`` nonzeros are trainable; ``G = [g_i]`` is
    ``(output_dim, r)`` and ``H = [h_i]`` ``(input_dim, r)``. Equivalently
    ``W = sum_(k<m) A^k G H^T B^k``. For ``output_dim != input_dim`` both Krylov matrices have
    the same ``m`` columns, ``m = min(output_dim, input_dim)`` by default: then every
    matrix whose displacement ``W - A W B`` has rank ``<= r`` for nilpotent ``A`` or ``B``
    (e.g. shifts; this includes Toeplitz matrices with ``r = 2``) is represented exactly.

    Forward and backward never form a Krylov matrix: ``W = sum_(l<b) A^l W_0 B^l`` with
    ``W_0`` of rank ``r ceil(m / b)`` built from ``ceil(m / b)`` "chain starts"; the product
    with a batch is applied with the explicit ``W`` or in factored form, whichever the cost
    model says is cheaper for the batch size.

    Args:
        input_dim, output_dim, nb_params_share, use_bias, initial_weight_matrix, initial_bias:
            as for every :class:`~structurednets.StructuredLayer`. ``initial_weight_matrix`` is
            fitted by :func:`~structurednets_ldr.fit.fit_ldr` (float64 L-BFGS from
            shift and low-rank starts).
        displacement_rank: ``r``; by default the largest the budget allows,
            ``floor(share * in * out / (in + out)) - 3``.
        krylov_columns: ``m``; default ``min(input_dim, output_dim)``.
        operators: ``(A, B)`` as dense ``(output_dim, output_dim)`` and ``(input_dim,
            input_dim)`` arrays or tensors, tridiagonal plus corners, to start from (also the
            start of the fit when ``initial_weight_matrix`` is given).
        generators: ``(G, H)`` to start from; their columns are the displacement rank.
        fit_max_evaluations, fit_max_seconds: limits of the fit to ``initial_weight_matrix``.
        max_cost_ratio: a bound on :meth:`cost_ratio` (forward and backward multiply-adds at
            batch 256 against ``nn.Linear``): the displacement rank is the largest within the
            budget whose layout meets it (a given ``displacement_rank`` must meet it);
            ValueError naming the smallest achievable ratio if none does. A fit control,
            not part of the layout.
        cache_weight: keep the built ``W`` for calls that need no gradient (inference) while
            the parameters are unchanged: such calls then cost one dense product, at the
            price of holding an ``output_dim x input_dim`` matrix. Off by default.

    Shape:
        input: ``(..., input_dim)``; output: ``(..., output_dim)``.

    Attributes:
        A_bands: ``(3, output_dim)``: ``A[i, i-1]``, ``A[i, i]``, ``A[i, i+1]`` (indices
            modulo ``output_dim``; the corners ``A[0, -1]`` and ``A[-1, 0]`` are
            ``A_bands[0, 0]`` and ``A_bands[2, -1]``).
        B_bands: ``(3, input_dim)``, likewise.
        G: ``(output_dim, r)``.
        H: ``(input_dim, r)``.
        displacement_rank, krylov_columns: ``r`` and ``m``; with the sizes they are the
            layer's :attr:`layout` (``layout.sizes``).
        fit_relative_error: relative Frobenius error of the fit to ``initial_weight_matrix``,
            else ``None``.

    Example:
        >>> layer = LDRLayer(256, 256, nb_params_share=0.1)
        >>> layer.layout.sizes
        {'displacement_rank': 9, 'krylov_columns': 256}
        >>> layer(torch.randn(8, 256)).shape
        torch.Size([8, 256])
        >>> twin = structurednets.create("ldr", layout=layer.layout)
        >>> twin.load_state_dict(layer.state_dict())
        <All keys matched successfully>
    """

    structure_name = "ldr"
    accepts_max_cost_ratio = True

    #: Under autocast the Krylov and Horner recursions that build the product run in the
    #: parameters' dtype (float32): in bfloat16 their rounding errors add up over the
    #: ``krylov_columns`` steps (3x a bfloat16 nn.Linear's error at 512 x 384); only the
    #: result is rounded to the autocast dtype.
    autocast_full_precision = ("A_bands", "B_bands", "G", "H")

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        nb_params_share: float,
        use_bias: bool = True,
        initial_weight_matrix: object = None,
        initial_bias: object = None,
        *,
        displacement_rank: int | None = None,
        krylov_columns: int | None = None,
        operators: tuple[object, object] | None = None,
        generators: tuple[object, object] | None = None,
        fit_max_evaluations: int = 400,
        fit_max_seconds: float = 50.0,
        cache_weight: bool = False,
        max_cost_ratio: float | None = None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, initial_bias)
        if not isinstance(cache_weight, bool):
            raise TypeError(f"cache_weight must be True or False, got {cache_weight!r}")
        self.cache_weight = cache_weight
        self._cached: tuple[tuple, torch.Tensor] | None = None
        target = self.checked_weight_matrix(initial_weight_matrix)
        if generators is not None:
            if target is not None:
                raise ValueError("pass either initial_weight_matrix or generators, not both")
            rank = generator_rank(generators)
            if displacement_rank is not None and displacement_rank != rank:
                raise ValueError(
                    f"displacement_rank={displacement_rank!r} disagrees with the columns of "
                    f"generators ({rank})"
                )
            displacement_rank = rank
        self.displacement_rank = displacement_rank_for(
            self.input_dim, self.output_dim, self.nb_params_share, displacement_rank
        )
        if krylov_columns is None:
            krylov_columns = min(self.input_dim, self.output_dim)
        self.krylov_columns = check_positive_int("krylov_columns", krylov_columns)
        if max_cost_ratio is not None:
            fixed = displacement_rank is not None
            rank = rank_within_cost(
                self.output_dim,
                self.input_dim,
                self.krylov_columns,
                self.displacement_rank,
                max_cost_ratio,
            )
            if fixed and rank != self.displacement_rank:
                raise ValueError(
                    f"displacement_rank={self.displacement_rank} costs more than "
                    f"max_cost_ratio={max_cost_ratio!r}; rank {rank} is the largest within it"
                )
            self.displacement_rank = rank
        A_bands, B_bands = self._operator_bands(operators)
        r = self.displacement_rank
        sizes = (self.output_dim, self.input_dim, self.krylov_columns, r)
        # Form and chain length per batch size, for training and for inference (shapes
        # only, so chosen once here): ((below, explicit, chain_length), ...); and the chain
        # lengths of W alone.
        self._schedules = {training: schedule_table(*sizes, training) for training in (True, False)}
        self._weight_chain_lengths = {
            training: choose_schedule(*sizes, None, training=training)[1]
            for training in (True, False)
        }
        #: Relative Frobenius error of the fit to ``initial_weight_matrix`` (else ``None``).
        self.fit_relative_error: float | None = None
        if generators is not None:
            G = as_matrix("generators[0] (G)", generators[0], self.output_dim, r, "output_dim x r")
            H = as_matrix("generators[1] (H)", generators[1], self.input_dim, r, "input_dim x r")
        elif target is not None:
            fit = fit_ldr(
                target,
                r,
                self.krylov_columns,
                operators=None if operators is None else (A_bands, B_bands),
                max_evaluations=check_positive_int("fit_max_evaluations", fit_max_evaluations),
                max_seconds=float(fit_max_seconds),
            )
            A_bands, B_bands, G, H = fit.A_bands, fit.B_bands, fit.G, fit.H
            self.fit_relative_error = fit.relative_error
        else:
            # With orthogonal (cyclic shift) operators the entries of W are sums of m r
            # products of independent entries of G and H: scale them to nn.Linear's std.
            scale = (dense_init_std(self.input_dim) ** 2 / (self.krylov_columns * r)) ** 0.25
            G = torch.randn(self.output_dim, r, dtype=torch.float64) * scale
            H = torch.randn(self.input_dim, r, dtype=torch.float64) * scale
        dtype = torch.get_default_dtype()
        self.A_bands = nn.Parameter(A_bands.to(dtype))
        self.B_bands = nn.Parameter(B_bands.to(dtype))
        self.G = nn.Parameter(G.to(dtype))
        self.H = nn.Parameter(H.to(dtype))

    def _operator_bands(self, operators: object) -> tuple[torch.Tensor, torch.Tensor]:
        if operators is None:
            # A = Z_1 and B = Z_(-1)^T: cyclic shifts, so powers stay bounded, and
            # W is Toeplitz-like for square layers.
            return (
                cyclic_shift_bands(self.output_dim, 1.0, dtype=torch.float64),
                cyclic_shift_bands(self.input_dim, -1.0, down=False, dtype=torch.float64),
            )
        if not isinstance(operators, (tuple, list)) or len(operators) != 2:
            raise TypeError(
                "operators must be a pair (A, B) of dense arrays or tensors of shapes "
                f"(output_dim, output_dim) and (input_dim, input_dim), got {type(operators).__name__}"
            )
        return (
            bands_from_dense("operators[0] (A)", operators[0], self.output_dim),
            bands_from_dense("operators[1] (B)", operators[1], self.input_dim),
        )

    def layout_sizes(self) -> dict[str, object]:
        """``{"displacement_rank": r, "krylov_columns": m}``: with the operators' fixed
        three bands these fix every parameter's shape (the chain lengths follow from them)."""
        return {
            "displacement_rank": self.displacement_rank,
            "krylov_columns": self.krylov_columns,
        }

    @classmethod
    def layout_cost(cls, layout: Layout, batch_size: int) -> Cost:
        """Multiply-adds of a training call (forward, then backward with the input's
        gradient) with the schedule the layer takes for ``batch_size``: the chain starts,
        ``W_0`` and the Horner steps (explicit ``W``, then ``U W^T``) or the factored
        products, and their adjoints (:func:`structurednets_ldr.cost.ldr_cost`). A call
        without gradient may take a cheaper schedule."""
        sizes = layout.sizes
        return ldr_cost(
            layout.output_dim,
            layout.input_dim,
            sizes["krylov_columns"],
            sizes["displacement_rank"],
            batch_size,
        )

    def lr_multipliers(self) -> dict[str, float]:
        """Learning-rate factors for :func:`structurednets.param_groups`: ``1/m`` for the
        operator bands, since a change of the bands enters ``W`` through up to ``m - 1``
        powers, and ``1/sqrt(r)`` for the generators, whose ``r`` rank-one terms move
        together; one Adam step then changes the outputs about as much as in ``nn.Linear``."""
        operators = 1.0 / self.krylov_columns
        generators = 1.0 / self.displacement_rank**0.5
        return {"A_bands": operators, "B_bands": operators, "G": generators, "H": generators}

    @property
    def operators(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as dense matrices (differentiable)."""
        return bands_to_dense(self.A_bands), bands_to_dense(self.B_bands)

    def multiply(self, U: torch.Tensor) -> torch.Tensor:
        if U.dtype != self.G.dtype:  # autocast: see autocast_full_precision
            return self._multiply(U.to(self.G.dtype)).to(U.dtype)
        return self._multiply(U)

    def _multiply(self, U: torch.Tensor) -> torch.Tensor:
        if (
            self.cache_weight
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (U.requires_grad or self.G.requires_grad))
        ):
            return U @ self._inference_weight().T
        training = torch.is_grad_enabled() and (
            U.requires_grad or any(p.requires_grad for p in self._operands())
        )
        explicit, chain_length = self._schedule_for(U.shape[0], training)
        return kernels.multiply(
            U,
            self.A_bands,
            self.B_bands,
            self.G,
            self.H,
            self.krylov_columns,
            chain_length,
            explicit,
        )

    def _operands(self) -> tuple[torch.Tensor, ...]:
        return self.A_bands, self.B_bands, self.G, self.H

    def _schedule_for(self, batch: int, training: bool) -> tuple[bool, int]:
        """``(explicit, chain_length)`` for this batch size; comparisons only, which
        ``torch.compile`` turns into guards on a dynamic batch size."""
        return schedule_for(self._schedules[training], batch)

    @torch.compiler.disable
    def _inference_weight(self) -> torch.Tensor:
        """``W`` built once per state of the parameters (their versions, storage, dtype)."""
        parameters = (self.A_bands, self.B_bands, self.G, self.H)
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in parameters)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                self._cached = (key, self.to_dense())
        return self._cached[1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cached"] = None  # not part of the layer's state
        return state

    def to_dense(self) -> torch.Tensor:
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self._operands())
        return kernels.weight(
            *self._operands(), self.krylov_columns, self._weight_chain_lengths[training]
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, displacement_rank={self.displacement_rank}, "
            f"krylov_columns={self.krylov_columns}"
        )
