"""The contract every structured layer implements."""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import torch
from torch import nn

from structurednets.cost import DEFAULT_COST_BATCH_SIZE, Cost, dense_cost
from structurednets.layers.layer_helpers import get_nb_model_parameters
from structurednets.layout import Layout, thaw
from structurednets.precision import autocast_dtype, run_under_autocast
from structurednets.validation import (
    BudgetTooSmallError,
    as_matrix,
    as_vector,
    check_dim,
    check_positive_int,
    check_share,
    weight_budget,
)

__all__ = ["StructuredLayer", "dense_init_std"]


def dense_init_std(input_dim: int) -> float:
    """Standard deviation of the entries of a freshly initialised ``nn.Linear(input_dim, ...)``.

    ``nn.Linear`` draws from U(-1/sqrt(input_dim), 1/sqrt(input_dim)); random structured layers
    scale their factors so that the entries of the represented matrix have this deviation.
    """
    return 1.0 / math.sqrt(3.0 * input_dim)


class StructuredLayer(nn.Module, abc.ABC):
    """A linear layer ``y = u @ W.T + b`` whose weight ``W`` (output_dim x input_dim) is structured.

    Subclasses call ``super().__init__`` first, turn ``initial_weight_matrix`` into a checked
    tensor with :meth:`checked_weight_matrix`, create their parameters (never more than
    :attr:`weight_budget` scalars), and implement :meth:`multiply` and :meth:`layout_sizes`.
    They may override :meth:`to_dense` where they know a cheaper way than multiplying the
    identity, and :meth:`from_layout` where the layout's sizes are not constructor options.

    Under ``torch.autocast`` the layer computes in the autocast dtype and returns it, as
    ``nn.Linear`` does; parameters and gradients keep their dtype (see
    :mod:`structurednets.precision`). ``multiply`` then runs with autocast off on the input and
    the parameters cast to the autocast dtype, except those named in
    :attr:`autocast_full_precision`.

    Args:
        input_dim: size of each input sample.
        output_dim: size of each output sample.
        nb_params_share: share in (0, 1] of the ``input_dim * output_dim`` dense weights the
            structured weight may hold; the bias does not count against it.
        use_bias: whether the layer adds a learned bias.
        initial_bias: ``(output_dim,)`` array or tensor to start the bias from; otherwise it is
            drawn as ``nn.Linear`` draws it.

    Shape:
        input: ``(..., input_dim)``; output: ``(..., output_dim)``.

    Attributes:
        weight_budget: the most weight scalars the layer may hold,
            ``floor(nb_params_share * input_dim * output_dim)``.
        bias: the learnable ``(output_dim,)`` bias, or ``None``.
    """

    #: The name the structure is registered under (used in messages).
    structure_name: ClassVar[str] = "structured"

    #: Parameters and buffers (names as in ``named_parameters``, or prefixes ending in ".")
    #: that keep their own dtype under autocast, for a step that needs more precision (a
    #: long recursion, a state update): ``multiply`` sees them in their dtype and the input
    #: in the autocast dtype, runs that step in ``precision.accumulation_dtype`` and returns
    #: the input's dtype.
    autocast_full_precision: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        nb_params_share: float,
        use_bias: bool = True,
        initial_bias: object = None,
    ):
        super().__init__()
        self.input_dim = check_dim("input_dim", input_dim)
        self.output_dim = check_dim("output_dim", output_dim)
        self.nb_params_share = check_share(nb_params_share)
        if not isinstance(use_bias, bool):
            raise TypeError(f"use_bias must be True or False, got {use_bias!r}")
        self.weight_budget = weight_budget(self.input_dim, self.output_dim, self.nb_params_share)
        dtype = torch.get_default_dtype()
        if use_bias:
            if initial_bias is None:
                bound = 1.0 / math.sqrt(self.input_dim)
                bias = torch.empty(self.output_dim, dtype=dtype).uniform_(-bound, bound)
            else:
                bias = as_vector("initial_bias", initial_bias, self.output_dim).to(dtype)
            self.bias = nn.Parameter(bias)
        else:
            if initial_bias is not None:
                raise ValueError("initial_bias was given but use_bias=False; drop one of them")
            self.register_parameter("bias", None)

    # -- for subclasses -------------------------------------------------------------------

    def checked_weight_matrix(self, initial_weight_matrix: object) -> torch.Tensor | None:
        """``initial_weight_matrix`` checked and copied to a float64 CPU tensor, or ``None``."""
        if initial_weight_matrix is None:
            return None
        return as_matrix(
            "initial_weight_matrix", initial_weight_matrix, self.output_dim, self.input_dim
        )

    def require_budget(self, needed: int, what: str = "its smallest form") -> None:
        """Raise :class:`BudgetTooSmallError` if ``needed`` weight scalars exceed the budget."""
        if needed > self.weight_budget:
            raise BudgetTooSmallError(
                self.structure_name,
                self.input_dim,
                self.output_dim,
                self.nb_params_share,
                needed,
                what,
            )

    @abc.abstractmethod
    def layout_sizes(self) -> dict[str, object]:
        """The structure's shape decisions as JSON values (ints, lists, dicts).

        They are keyword options of the constructor (and of the registered
        ``nb_weight_parameters``) that rebuild exactly this shape: the same parameters and
        persistent buffers, with the same names and shapes, so that this layer's state dict
        loads into ``type(self).from_layout(self.layout)``.
        """

    @abc.abstractmethod
    def multiply(self, U: torch.Tensor) -> torch.Tensor:
        """``U @ W.T`` for ``U`` of shape ``(batch, input_dim)``; returns ``(batch, output_dim)``.

        The bias is not added here. ``U`` is already checked (floating, right width, the
        layer's dtype); autocast is off (under autocast, ``U`` and the parameters arrive cast
        to the autocast dtype, see :attr:`autocast_full_precision`).
        """

    # -- the public contract --------------------------------------------------------------

    def forward(self, U: torch.Tensor) -> torch.Tensor:
        """``U @ W.T + b`` for ``U`` of shape ``(..., input_dim)``; returns ``(..., output_dim)``."""
        dtype = self._check_input(U)
        if dtype is not None:
            return run_under_autocast(self, U, dtype, self._forward)
        return self._forward(U)

    def _forward(self, U: torch.Tensor) -> torch.Tensor:
        batch_shape = U.shape[:-1]
        Y = self.multiply(U.reshape(-1, self.input_dim))
        if self.bias is not None:
            Y = Y + self.bias
        if U.dim() == 2:  # no reshape: a view would trip FSDP's output hooks
            return Y
        return Y.reshape(*batch_shape, self.output_dim)

    def to_dense(self) -> torch.Tensor:
        """The represented weight ``W``, shape ``(output_dim, input_dim)``; differentiable."""
        reference = self._reference_parameter()
        eye = torch.eye(self.input_dim, dtype=reference.dtype, device=reference.device)
        return self.multiply(eye).T

    @property
    def layout(self) -> Layout:
        """Everything that fixes this layer's shape; see :class:`structurednets.Layout`.

        Built once (shapes do not change after construction) and kept, since ``state_dict``
        asks for it every time.
        """
        cached = self.__dict__.get("_layout")
        if cached is not None:
            return cached
        layout = Layout(
            self.structure_name,
            self.input_dim,
            self.output_dim,
            bias=self.bias is not None,
            nb_params_share=self.nb_params_share,
            sizes=self.layout_sizes(),
        )
        self.__dict__["_layout"] = layout
        return layout

    @classmethod
    def layout_cost(cls, layout: Layout, batch_size: int) -> Cost:
        """Multiply-adds of a forward and a backward of a layer of ``layout`` for a batch of
        ``batch_size`` inputs (see :mod:`structurednets.cost`): exact counts of what the
        kernels do, from the layout alone. Every structure implements it."""
        raise NotImplementedError(
            f"{cls.__name__} does not report the cost of its layout; implement "
            "layout_cost(layout, batch_size)"
        )

    @classmethod
    def error_curve(
        cls, matrix: torch.Tensor, input_statistics: object, max_weights: int
    ) -> list[tuple[int, float]] | None:
        """The squared relative errors of this structure's fits of ``matrix`` at every budget
        up to ``max_weights`` weight scalars that it can tell without fitting, as
        ``(nb_weight_parameters, squared_relative_error)`` pairs; for the global allocation of
        :func:`structurednets.compress` (:mod:`structurednets.allocation`).

        ``matrix``: ``(output_dim, input_dim)``, float64. With ``input_statistics`` (an
        :class:`~structurednets.calibration.InputStatistics`) the error is the output error
        in the damped norm the fit minimises, ``||(W - W~) S||^2 / ||W S||^2``; without, the
        weight error. ``None`` (the default): core fits at a few shares instead. Low rank
        overrides it (every rank from one SVD)."""
        return None

    def cost(self, batch_size: int = DEFAULT_COST_BATCH_SIZE) -> Cost:
        """This layer's :meth:`layout_cost` for a batch of ``batch_size`` inputs."""
        return type(self).layout_cost(self.layout, check_positive_int("batch_size", batch_size))

    def cost_ratio(self, batch_size: int = DEFAULT_COST_BATCH_SIZE) -> float:
        """Forward plus backward multiply-adds against ``nn.Linear`` of the same shape."""
        dense = dense_cost(self.input_dim, self.output_dim, batch_size)
        return self.cost(batch_size).ratio(dense)

    @classmethod
    def from_layout(cls, layout: Layout) -> StructuredLayer:
        """An unfitted (randomly initialised) layer of exactly ``layout``.

        Load a state dict into it to restore a fitted layer without refitting.
        """
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a structurednets.Layout, got {type(layout).__name__}")
        return cls(
            layout.input_dim,
            layout.output_dim,
            layout.nb_params_share,
            use_bias=layout.bias,
            **thaw(layout.sizes),
        )

    def get_nb_parameters(self) -> int:
        """Number of trainable scalars, bias included."""
        return get_nb_model_parameters(self)

    @property
    def nb_weight_parameters(self) -> int:
        """Number of trainable scalars of the weight representation (bias excluded)."""
        bias = 0 if self.bias is None else self.bias.numel()
        return self.get_nb_parameters() - bias

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, output_dim={self.output_dim}, "
            f"nb_params_share={self.nb_params_share:g}, "
            f"nb_parameters={self.get_nb_parameters()}, bias={self.bias is not None}"
        )

    # -- saving and loading -----------------------------------------------------------------

    def get_extra_state(self) -> dict[str, object]:
        """The layout (as JSON values), saved with the state dict and checked on load."""
        return {
            "structure": self.structure_name,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "layout": self.layout.to_json(),
        }

    def set_extra_state(self, state: object) -> None:
        """Checked in :meth:`_load_from_state_dict`; nothing to restore."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, object],
        prefix: str,
        local_metadata: dict[str, object],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        saved = state_dict.get(prefix + "_extra_state")
        if isinstance(saved, dict):
            problem = self._layout_mismatch(saved)
            if problem:
                error_msgs.append(problem)
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _layout_mismatch(self, saved: dict[str, object]) -> str | None:
        mine = self.layout
        given = (saved.get("structure"), saved.get("input_dim"), saved.get("output_dim"))
        if given != (mine.structure, mine.input_dim, mine.output_dim):
            return (
                f"the state dict holds a '{given[0]}' layer of {given[2]} x {given[1]} "
                f"(output x input), but it is loaded into a '{mine.structure}' layer of "
                f"{mine.output_dim} x {mine.input_dim}; create the layer with the arguments the "
                "state dict was saved from"
            )
        if "layout" not in saved:  # saved before layouts existed: the sizes are all we know
            return None
        try:
            theirs = Layout.from_json(saved["layout"])
        except (TypeError, ValueError) as error:
            return f"the state dict's layout cannot be read: {error}"
        differences = theirs.differences(mine)
        if not differences:
            return None
        return (
            f"the state dict holds a layer of layout [{theirs}], but it is loaded into one "
            f"of layout [{mine}]; they differ in: {'; '.join(differences)}. Build the layer "
            "with structurednets.create(name, layout=...) from the saved layout "
            "(Layout.from_json(state_dict['_extra_state']['layout'])), or use structurednets.load"
        )

    # -- internals --------------------------------------------------------------------------

    def _reference_parameter(self) -> torch.Tensor:
        return next(self.parameters())

    def _check_input(self, U: object) -> torch.dtype | None:
        """Raise on bad input; return the autocast dtype to compute in, or ``None``."""
        if not isinstance(U, torch.Tensor):
            raise TypeError(
                f"input must be a torch.Tensor of shape (..., {self.input_dim}), "
                f"got {type(U).__name__}"
            )
        if not U.is_floating_point():
            raise TypeError(
                f"input must be a floating-point tensor, got dtype {U.dtype}; "
                "convert it first, e.g. U.float()"
            )
        if U.dim() == 0 or U.shape[-1] != self.input_dim:
            raise ValueError(
                f"input must have shape (..., input_dim={self.input_dim}), "
                f"got shape {tuple(U.shape)}"
            )
        dtype = self._reference_parameter().dtype
        compute = autocast_dtype(U.device.type)
        if compute is not None and dtype != torch.float64:  # autocast leaves float64 alone
            return compute
        if U.dtype != dtype:
            raise TypeError(
                f"input has dtype {U.dtype} but the layer's parameters are {dtype}; convert "
                f"the input (U.to({dtype})) or the layer (layer.to({U.dtype})), "
                "or run under torch.autocast"
            )
        return None
