"""Sequentially semiseparable layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from structurednets import StructuredLayer
from structurednets.layers.structured_layer import dense_init_std
from structurednets_sss.identification import identify_checked
from structurednets_sss.kernels import PADDED_KINDS, SSSMultiply, padded_dense
from structurednets_sss.plan import KINDS, SSSPlan, check_options, plan_from_options
from structurednets_sss.system import SSSSystem, check_system_fits, random_system

__all__ = ["SSSLayer"]


class SSSLayer(StructuredLayer):
    """Sequentially semiseparable layer: ``W`` is the input-output map of a time-varying
    linear system with ``K`` stages, so its off-diagonal blocks have low rank.

    The input is split into blocks ``u_0 .. u_{K-1}`` and the output into ``y_0 .. y_{K-1}``::

        causal:      x_{k+1} = A_k x_k + B_k u_k
        anticausal:  z_{k-1} = E_k z_k + F_k u_k
        output:      y_k     = C_k x_k + D_k u_k + G_k z_k

    The state dimensions bound the ranks of the Hankel blocks (``W[rows after a boundary,
    columns before it]`` and its mirror above the diagonal) and set the parameter count.
    Forward and backward cost ``O(batch * nb_parameters)``: one batched product per kind of
    stage matrix, and ``K - 2`` small products for each state recursion.

    Args:
        input_dim, output_dim, nb_params_share, use_bias, initial_weight_matrix, initial_bias:
            as for every :class:`~structurednets.StructuredLayer`. ``initial_weight_matrix``
            is approximated by system identification: truncated SVDs of its Hankel blocks,
            with the number of stages and every state dimension chosen to minimise the
            Frobenius error within the budget (see :mod:`structurednets_sss.identification`).
        nb_states: the number of stages ``K`` (1 .. min(input_dim, output_dim)); block sizes
            are as even as possible. Default: chosen from the matrix when one is given,
            otherwise the fewest stages (a power of two) whose diagonal blocks take at most
            half of the budget (:func:`~structurednets_sss.plan.default_nb_stages`).
        state_dim: the state dimension, one integer for every boundary between stages or a
            sequence of ``K - 1`` (boundary ``p`` lies between stages ``p`` and ``p + 1``).
            Dimensions larger than the rank a state can carry there are capped. Default: from
            the singular values when fitting a matrix, otherwise the largest uniform dimension
            that fits the budget.
        anticausal_state_dim: the same for the anticausal part; defaults to ``state_dim``.
        system: an :class:`~structurednets_sss.SSSSystem` to start from; it fixes the stages,
            block sizes (any, not only even) and state dimensions.

    Attributes:
        plan: the sizes (:class:`~structurednets_sss.SSSPlan`): block sizes and state
            dimensions.
        D, A, B, C, E, F, G: the stage matrices of each kind, flattened and concatenated
            stage by stage (row-major) into one parameter each; a kind without any entries is
            ``None``. :meth:`system` returns them as matrices.

    Example:
        >>> layer = SSSLayer(512, 256, nb_params_share=0.1)
        >>> layer.nb_states
        32
        >>> layer(torch.randn(8, 512)).shape
        torch.Size([8, 256])
    """

    structure_name = "sss"

    #: Under autocast the state transitions ``A`` and ``E`` keep their dtype and the state
    #: recursions accumulate in float32 (see ``kernels._recursions``); the other products
    #: run in the autocast dtype.
    autocast_full_precision = ("A", "E")

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        nb_params_share: float,
        use_bias: bool = True,
        initial_weight_matrix: object = None,
        initial_bias: object = None,
        *,
        nb_states: int | None = None,
        state_dim: int | Sequence[int] | None = None,
        anticausal_state_dim: int | Sequence[int] | None = None,
        system: SSSSystem | None = None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, initial_bias)
        target = self.checked_weight_matrix(initial_weight_matrix)
        if system is not None:
            if not isinstance(system, SSSSystem):
                raise TypeError(f"system must be an SSSSystem, got {type(system).__name__}")
            given = [
                name
                for name, value in (
                    ("initial_weight_matrix", target),
                    ("nb_states", nb_states),
                    ("state_dim", state_dim),
                    ("anticausal_state_dim", anticausal_state_dim),
                )
                if value is not None
            ]
            if given:
                raise ValueError(
                    f"system fixes the whole layer; do not pass {', '.join(given)} with it"
                )
            plan = check_system_fits(system, self.input_dim, self.output_dim, self.nb_params_share)
            matrices = system.checked()[1]
        else:
            options = check_options(
                self.input_dim, self.output_dim, nb_states, state_dim, anticausal_state_dim
            )
            if target is not None:
                fitted = identify_checked(target, self.weight_budget, options, self.nb_params_share)
                plan, matrices = fitted.plan, fitted.matrices
            else:
                plan = plan_from_options(
                    self.input_dim, self.output_dim, self.nb_params_share, options
                )
                matrices = random_system(plan, dense_init_std(self.input_dim))
        self.require_budget(plan.nb_weight_parameters, plan.describe())
        self.plan = plan
        self._build(plan, matrices)

    # -- layout ---------------------------------------------------------------------------

    def _build(self, plan: SSSPlan, matrices: dict[str, list[torch.Tensor]]) -> None:
        """Create one flat parameter per kind and the layout that pads it into stacks."""
        dtype = torch.get_default_dtype()
        K = plan.nb_stages
        shapes = plan.stage_shapes()
        dx = max(plan.causal_dims, default=0)
        dz = max(plan.anticausal_dims, default=0)
        mb, nb = max(plan.output_sizes), max(plan.input_sizes)
        # Per kind: the stages it is stacked over and the padded matrix shape.
        stacks = {
            "D": (range(0, K), (mb, nb)),
            "A": (range(1, K - 1), (dx, dx)),
            "B": (range(0, K - 1), (dx, nb)),
            "C": (range(1, K), (mb, dx)),
            "E": (range(1, K - 1), (dz, dz)),
            "F": (range(1, K), (dz, nb)),
            "G": (range(0, K - 1), (mb, dz)),
        }
        self._padded_shapes: dict[str, tuple[int, int, int]] = {}
        self._ragged: set[str] = set()
        for kind in KINDS:
            stages, (rows, cols) = stacks[kind]
            self._padded_shapes[kind] = (len(stages), rows, cols)
            flat = torch.cat([m.reshape(-1) for m in matrices[kind]]).to(dtype)
            if flat.numel():
                self.register_parameter(kind, nn.Parameter(flat))
            else:
                self.register_parameter(kind, None)
            mask = torch.zeros(len(stages), rows, cols, dtype=torch.bool)
            for j, k in enumerate(stages):
                r, c = shapes[kind][k]
                mask[j, :r, :c] = True
            if not bool(mask.all()):
                self._ragged.add(kind)
                self.register_buffer(f"_{kind}_mask", mask, persistent=False)
        # Where the input/output entries sit in the padded layout (None: nothing padded).
        self.register_buffer(
            "_input_positions",
            _positions(plan.input_sizes, nb) if min(plan.input_sizes) != nb else None,
            persistent=False,
        )
        self.register_buffer(
            "_output_positions",
            _positions(plan.output_sizes, mb) if min(plan.output_sizes) != mb else None,
            persistent=False,
        )

    def _padded(self, kind: str) -> torch.Tensor:
        """The stack of ``kind`` matrices, ``(stages, rows, cols)``, zero-padded."""
        flat = getattr(self, kind)
        shape = self._padded_shapes[kind]
        if flat is None:
            reference = self._reference_parameter()
            return reference.new_zeros(shape)
        if kind in self._ragged:
            mask = getattr(self, f"_{kind}_mask")
            return flat.new_zeros(shape).masked_scatter(mask, flat)
        return flat.view(shape)

    def _padded_stacks(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        stacks = [self._padded(kind) for kind in PADDED_KINDS]
        if dtype is not None:
            stacks = [stack.to(dtype) for stack in stacks]
        return stacks

    # -- the contract ---------------------------------------------------------------------

    def multiply(self, U: torch.Tensor) -> torch.Tensor:
        # Under autocast, core's policy hands over U and the parameters in the autocast dtype.
        stacks = self._padded_stacks()
        if self._input_positions is not None:
            K, _, nb = self._padded_shapes["D"]
            U = U.new_zeros(U.shape[0], K * nb).index_copy(1, self._input_positions, U)
        Y = SSSMultiply.apply(U.contiguous(), *stacks)
        if self._output_positions is not None:
            Y = Y.index_select(1, self._output_positions)
        return Y

    def to_dense(self) -> torch.Tensor:
        dense = padded_dense(*self._padded_stacks())
        if self._output_positions is not None:
            dense = dense.index_select(0, self._output_positions)
        if self._input_positions is not None:
            dense = dense.index_select(1, self._input_positions)
        return dense

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.plan.describe()}"

    # -- inspection -----------------------------------------------------------------------

    @property
    def nb_states(self) -> int:
        """The number of stages ``K`` (the seed library's name)."""
        return self.plan.nb_stages

    @property
    def state_dims(self) -> tuple[int, ...]:
        """Causal state dimension at each boundary (``K - 1`` values)."""
        return self.plan.causal_dims

    @property
    def anticausal_state_dims(self) -> tuple[int, ...]:
        """Anticausal state dimension at each boundary (``K - 1`` values)."""
        return self.plan.anticausal_dims

    def system(self) -> SSSSystem:
        """The stage matrices as an :class:`SSSSystem` (detached copies in the layer's dtype);
        ``SSSLayer(..., system=layer.system())`` rebuilds the layer."""
        shapes = self.plan.stage_shapes()
        reference = self._reference_parameter()
        matrices = {}
        for kind in KINDS:
            flat = getattr(self, kind)
            if flat is None:
                flat = reference.new_zeros(0)
            sizes = [r * c for r, c in shapes[kind]]
            pieces = flat.detach().split(sizes)
            matrices[kind] = [
                piece.reshape(shape).clone()
                for piece, shape in zip(pieces, shapes[kind], strict=True)
            ]
        return SSSSystem(**matrices)


def _positions(sizes: Sequence[int], padded: int) -> torch.Tensor:
    """Where the entries of blocks of the given sizes go in a layout of ``padded``-wide blocks."""
    return torch.cat([torch.arange(size) + k * padded for k, size in enumerate(sizes)])
