"""Sequentially semiseparable layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from structurednets.cost import Cost
from structurednets.layout import Layout
from structurednets.plugin import StructuredLayer, dense_init_std
from structurednets_sss.fit import fit_checked
from structurednets_sss.kernels import SSSMultiply, padded_dense, split_stacks, sss_product
from structurednets_sss.layout import (
    KINDS,
    SSSSizes,
    check_cost_bound,
    check_max_cost_ratio,
    sizes_cost,
    sizes_from_options,
    stack_layout,
)
from structurednets_sss.options import check_options
from structurednets_sss.system import (
    SSSSystem,
    check_system_fits,
    diagonal_gain,
    random_system,
)

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
    Forward and backward cost ``O(batch * nb_parameters)`` (:meth:`layout_cost` counts them):
    two batched products over merged, padded stage stacks, and ``K - 2`` small products for
    each state recursion.

    Args:
        input_dim, output_dim, nb_params_share, use_bias, initial_weight_matrix, initial_bias:
            as for every :class:`~structurednets.StructuredLayer`. ``initial_weight_matrix``
            is approximated by :func:`~structurednets_sss.fit_sss` (system identification:
            truncated SVDs of its Hankel blocks, with the number of stages and every state
            dimension chosen to minimise the Frobenius error within the budget).
        nb_stages: the number of stages ``K`` (1 .. min(input_dim, output_dim)); block sizes
            are as even as possible. Default: chosen from the matrix when one is given,
            otherwise the fewest stages (a power of two) whose diagonal blocks take at most
            half of the budget (:func:`~structurednets_sss.default_nb_stages`).
        nb_states: another name for ``nb_stages`` (MatthiasKi/structurednets 1.0 calls the
            stages "states"); giving both with different values is a ``ValueError``.
        state_dim: the state dimension, one integer for every boundary between stages or a
            sequence of ``K - 1`` (boundary ``p`` lies between stages ``p`` and ``p + 1``).
            Dimensions larger than the rank a state can carry there are capped. Default: from
            the singular values when fitting a matrix, otherwise the largest uniform dimension
            that fits the budget.
        anticausal_state_dim: the same for the anticausal part; defaults to ``state_dim``.
        input_sizes, output_sizes, causal_dims, anticausal_dims: the exact sizes of a layout
            (``layer.layout.sizes``), all four together: the block sizes of the ``K`` stages
            and the ``K - 1`` state dimensions of each part, used as given (not capped).
        system: an :class:`~structurednets_sss.SSSSystem` to start from; it fixes the stages,
            block sizes (any, not only even) and state dimensions.
        max_cost_ratio: a bound on :meth:`cost_ratio` (forward and backward multiply-adds at
            batch 256 against ``nn.Linear``): the fit only considers layouts within it, and a
            layout built otherwise that exceeds it is a ``ValueError``. A fit control, not a
            shape: it is not part of ``layout.sizes``.

    Shape:
        input: ``(..., input_dim)``; output: ``(..., output_dim)``.

    Attributes:
        sizes: the block sizes and state dimensions (:class:`~structurednets_sss.SSSSizes`);
            ``layout.sizes`` holds them as JSON values.
        D, A, B, C, E, F, G: the stage matrices of each kind, flattened and concatenated
            stage by stage (row-major) into one parameter each; a kind without any entries is
            ``None``. :meth:`system` returns them as matrices.
        bias: the learnable ``(output_dim,)`` bias, or ``None``.

    Example:
        >>> layer = SSSLayer(512, 256, nb_params_share=0.1)
        >>> layer.nb_stages, layer.state_dims[:3]
        (32, (5, 5, 5))
        >>> layer(torch.randn(8, 512)).shape
        torch.Size([8, 256])
        >>> twin = structurednets.create("sss", layout=layer.layout)  # same shape, unfitted
        >>> _ = twin.load_state_dict(layer.state_dict())
        >>> U = torch.randn(8, 512)
        >>> torch.equal(twin(U), layer(U))
        True
    """

    structure_name = "sss"

    #: The fit takes ``max_cost_ratio`` (a bound on ``cost_ratio()``), which core may pass.
    accepts_max_cost_ratio = True

    #: Under autocast the state transitions ``A`` and ``E`` keep their dtype and the state
    #: recursions accumulate in float32 (see ``kernels._in_accumulation_dtype``); the other products
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
        nb_stages: int | None = None,
        nb_states: int | None = None,
        state_dim: int | Sequence[int] | None = None,
        anticausal_state_dim: int | Sequence[int] | None = None,
        input_sizes: Sequence[int] | None = None,
        output_sizes: Sequence[int] | None = None,
        causal_dims: Sequence[int] | None = None,
        anticausal_dims: Sequence[int] | None = None,
        system: SSSSystem | None = None,
        max_cost_ratio: float | None = None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, initial_bias)
        target = self.checked_weight_matrix(initial_weight_matrix)
        max_cost_ratio = check_max_cost_ratio(max_cost_ratio)
        options = {
            "nb_stages": nb_stages,
            "nb_states": nb_states,
            "state_dim": state_dim,
            "anticausal_state_dim": anticausal_state_dim,
            "input_sizes": input_sizes,
            "output_sizes": output_sizes,
            "causal_dims": causal_dims,
            "anticausal_dims": anticausal_dims,
        }
        if system is not None:
            if not isinstance(system, SSSSystem):
                raise TypeError(f"system must be an SSSSystem, got {type(system).__name__}")
            given = [name for name, value in options.items() if value is not None]
            if target is not None:
                given.insert(0, "initial_weight_matrix")
            if given:
                raise ValueError(
                    f"system fixes the whole layer; do not pass {', '.join(given)} with it"
                )
            sizes = check_system_fits(system, self.input_dim, self.output_dim, self.nb_params_share)
            check_cost_bound(sizes, max_cost_ratio, "the system")
            matrices = system.checked()[1]
        else:
            checked = check_options(self.input_dim, self.output_dim, **options)
            if target is not None:
                fitted = fit_checked(
                    target, self.weight_budget, checked, self.nb_params_share, max_cost_ratio
                )
                sizes, matrices = fitted.system.checked()
            else:
                sizes = sizes_from_options(
                    self.input_dim, self.output_dim, self.nb_params_share, checked
                )
                check_cost_bound(sizes, max_cost_ratio, "the layout these options give")
                matrices = random_system(sizes, dense_init_std(self.input_dim))
        self.require_budget(sizes.nb_weight_parameters, sizes.describe())
        self.sizes = sizes
        self._build(sizes, matrices)

    # -- stage stacks -----------------------------------------------------------------------

    def _build(self, sizes: SSSSizes, matrices: dict[str, list[torch.Tensor]]) -> None:
        """Create one flat parameter per kind, and the gather index (derived from the sizes,
        not saved) that places them, padded, into the kernel's stage stacks."""
        dtype = torch.get_default_dtype()
        for kind in KINDS:
            flat = torch.cat([m.reshape(-1) for m in matrices[kind]]).to(dtype)
            self.register_parameter(kind, nn.Parameter(flat) if flat.numel() else None)
        self._stack_shapes, index = stack_layout(sizes)
        self.register_buffer("_stack_index", index, persistent=False)
        # Where each parameter entry (in the order of the concatenated parameters) sits.
        inverse = torch.empty(sizes.nb_weight_parameters, dtype=torch.long)
        placed = torch.nonzero(index).squeeze(1)
        inverse[index[placed] - 1] = placed
        self.register_buffer("_stack_inverse", inverse, persistent=False)
        K, mb, nb = sizes.nb_stages, self._stack_shapes[1][1], self._stack_shapes[0][2]
        # Where the input/output entries sit in the padded stacks (None: nothing padded).
        self.register_buffer(
            "_input_positions",
            _positions(sizes.input_sizes, nb) if min(sizes.input_sizes) != nb else None,
            persistent=False,
        )
        gather = None
        if self._input_positions is not None:
            gather = torch.full((K * nb,), self.input_dim, dtype=torch.long)
            gather[self._input_positions] = torch.arange(self.input_dim)
        self.register_buffer("_input_gather", gather, persistent=False)
        self.register_buffer(
            "_output_positions",
            _positions(sizes.output_sizes, mb) if min(sizes.output_sizes) != mb else None,
            persistent=False,
        )

    def _stacks(self) -> list[torch.Tensor]:
        """``S_in``, ``S_out``, ``A``, ``E`` (see :mod:`structurednets_sss.kernels`), gathered
        from the parameters in one indexing (position 0 is a zero).

        Without autograd (inference) the stacks are kept and gathered again only when a
        parameter changes (its version, storage, dtype or device): padding once, not per call.
        """
        present = [getattr(self, kind) for kind in KINDS if getattr(self, kind) is not None]
        if torch.is_grad_enabled() and any(p.requires_grad for p in present):
            return self._gathered(present)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in present)
        cached = self.__dict__.get("_stack_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self._gathered(present))
            self.__dict__["_stack_cache"] = cached
        return cached[1]

    def _gathered(self, present: list[torch.Tensor]) -> list[torch.Tensor]:
        reference = self.D if self.D is not None else self._reference_parameter()
        # Under autocast A and E stay in float32 (cat promotes); the other stacks go back to
        # the autocast dtype.
        flat = _Gather.apply(self._stack_index, self._stack_inverse, reference.dtype, *present)
        sizes = [math.prod(shape) for shape in self._stack_shapes]
        stacks = [
            piece.view(shape)
            for piece, shape in zip(flat.split(sizes), self._stack_shapes, strict=True)
        ]
        stacks[0], stacks[1] = stacks[0].to(reference.dtype), stacks[1].to(reference.dtype)
        return stacks

    # -- the contract ---------------------------------------------------------------------

    def layout_sizes(self) -> dict[str, object]:
        """``input_sizes``, ``output_sizes``, ``causal_dims`` and ``anticausal_dims``."""
        return self.sizes.layout_sizes()

    @classmethod
    def layout_cost(cls, layout: Layout, batch_size: int) -> Cost:
        """Multiply-adds of the padded stage-stack kernel
        (:func:`~structurednets_sss.layout.sizes_cost`): ``batch`` times the padded stacks'
        scalars forward, twice that backward."""
        sizes = layout.sizes
        return sizes_cost(
            SSSSizes(
                tuple(sizes["input_sizes"]),
                tuple(sizes["output_sizes"]),
                tuple(sizes["causal_dims"]),
                tuple(sizes["anticausal_dims"]),
            ),
            batch_size,
        )

    def multiply(self, U: torch.Tensor) -> torch.Tensor:
        # Under autocast, core's policy hands over U and the parameters in the autocast dtype.
        stacks = self._stacks()
        if self._input_positions is not None:  # a zero column, then gathered into blocks
            U = torch.cat([U, U.new_zeros(U.shape[0], 1)], dim=1)
            U = U.index_select(1, self._input_gather)
        U = U.contiguous()
        if torch.is_grad_enabled() and (U.requires_grad or stacks[0].requires_grad):
            Y = SSSMultiply.apply(U, *stacks, self._padded_causal_dim)
        else:  # inference: the same product without autograd's bookkeeping
            Y = sss_product(U, *stacks, self._padded_causal_dim)[0]
        if self._output_positions is not None:
            Y = Y.index_select(1, self._output_positions)
        return Y

    def to_dense(self) -> torch.Tensor:
        dense = padded_dense(*split_stacks(*self._stacks(), self._padded_causal_dim))
        if self._output_positions is not None:
            dense = dense.index_select(0, self._output_positions)
        if self._input_positions is not None:
            dense = dense.index_select(1, self._input_positions)
        return dense

    def lr_multipliers(self) -> dict[str, float]:
        """Learning-rate factors for :func:`structurednets.param_groups`, so that one step
        changes the outputs about as much as in ``nn.Linear``.

        The ``D_k`` get :func:`~structurednets_sss.system.diagonal_gain` (their entries are
        that much larger than a dense layer's where no state reaches some blocks). The
        transitions ``A_k``, ``E_k`` get ``1 / sqrt(K)``: a block ``C_k A_{k-1} .. A_{j+1}
        B_j`` is a product of up to ``K - 2`` of them, whose changes add up along the chain
        (as a random walk, so ``sqrt`` of its length); without the factor, SGD at 0.5 blows
        the states up on the digits at 32 stages (``structurednets scratch``)."""
        factors = {} if self.D is None else {"D": diagonal_gain(self.sizes)}
        transition = self.sizes.nb_stages**-0.5
        for kind in ("A", "E"):
            if getattr(self, kind) is not None:
                factors[kind] = transition
        return factors

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.sizes.describe()}"

    # -- inspection -----------------------------------------------------------------------

    @property
    def _padded_causal_dim(self) -> int:
        return self.sizes.padded_dims()[2]

    @property
    def nb_stages(self) -> int:
        """The number of stages ``K``."""
        return self.sizes.nb_stages

    @property
    def nb_states(self) -> int:
        """The number of stages ``K`` (MatthiasKi/structurednets 1.0's name)."""
        return self.sizes.nb_stages

    @property
    def state_dims(self) -> tuple[int, ...]:
        """Causal state dimension at each boundary (``K - 1`` values)."""
        return self.sizes.causal_dims

    @property
    def anticausal_state_dims(self) -> tuple[int, ...]:
        """Anticausal state dimension at each boundary (``K - 1`` values)."""
        return self.sizes.anticausal_dims

    def system(self) -> SSSSystem:
        """The stage matrices as an :class:`SSSSystem` (detached copies in the layer's dtype);
        ``SSSLayer(..., system=layer.system())`` rebuilds the layer."""
        shapes = self.sizes.stage_shapes()
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


class _Gather(torch.autograd.Function):
    """``cat([0, *flats])[index]`` by ``index_select`` (measured four times faster than
    indexing), whose backward gathers too (``grad[inverse]``: each entry of a parameter is
    placed once) instead of scattering into zeros."""

    @staticmethod
    def forward(ctx, index, inverse, dtype, *flats):
        ctx.save_for_backward(inverse)
        ctx.dtypes = [flat.dtype for flat in flats]
        ctx.sizes = [flat.numel() for flat in flats]
        return torch.cat([flats[0].new_zeros(1, dtype=dtype), *flats]).index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        pieces = grad.index_select(0, inverse).split(ctx.sizes)
        grads = [piece.to(dtype) for piece, dtype in zip(pieces, ctx.dtypes, strict=True)]
        return (None, None, None, *grads)


def _positions(sizes: Sequence[int], padded: int) -> torch.Tensor:
    """Where the entries of blocks of the given sizes go among ``padded``-wide blocks."""
    return torch.cat([torch.arange(size) + k * padded for k, size in enumerate(sizes)])
