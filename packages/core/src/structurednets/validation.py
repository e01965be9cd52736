"""Argument checks shared by every structure, with messages that name the argument.

Plugins call these instead of writing their own, so that a bad argument gets the same
kind of error (what was expected, what was given) whatever the structure.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = [
    "BudgetTooSmallError",
    "as_matrix",
    "as_vector",
    "check_dim",
    "check_positive_int",
    "check_share",
    "smallest_share",
    "weight_budget",
]


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 1, else raise TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {_describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def check_dim(name: str, value: object) -> int:
    """Check a layer dimension (``input_dim``/``output_dim``): a positive integer."""
    return check_positive_int(name, value)


def check_share(nb_params_share: object, name: str = "nb_params_share") -> float:
    """Check a share (``nb_params_share``, or the argument ``name``): a real number in (0, 1]."""
    if isinstance(nb_params_share, bool) or not isinstance(nb_params_share, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1], got {_describe(nb_params_share)}")
    share = float(nb_params_share)
    if not 0.0 < share <= 1.0:  # also rejects NaN
        raise ValueError(
            f"{name} must be in (0, 1] (the share of the input_dim * output_dim "
            f"weights of a dense layer that the structured layer may hold), got {nb_params_share!r}"
        )
    return share


def weight_budget(input_dim: int, output_dim: int, nb_params_share: float) -> int:
    """The most weight scalars a layer may hold: ``floor(share * input_dim * output_dim)``.

    A relative slack of 1e-12 absorbs float rounding, so that ``0.29 * 100`` gives 29, not 28.
    """
    return math.floor(nb_params_share * input_dim * output_dim * (1.0 + 1e-12))


def smallest_share(nb_weight_parameters: int, input_dim: int, output_dim: int) -> float:
    """The smallest share, rounded up to 3 significant digits, whose budget holds the given count.

    Returns a value above 1 when even the dense budget is too small.
    """
    exact = nb_weight_parameters / (input_dim * output_dim)
    step = 10.0 ** (math.floor(math.log10(exact)) - 2)
    share = round(math.ceil(exact / step) * step, 12)
    while weight_budget(input_dim, output_dim, share) < nb_weight_parameters:
        share = round(share + step, 12)
    return share


class BudgetTooSmallError(ValueError):
    """The budget is too small for the smallest form of a structure at these dimensions.

    Attributes:
        structure: the structure's name.
        needed: weight scalars of the structure's smallest form.
        budget: weight scalars the given share allows.
        min_share: the smallest ``nb_params_share`` that works for these dimensions.
    """

    def __init__(
        self,
        structure: str,
        input_dim: int,
        output_dim: int,
        nb_params_share: float,
        needed: int,
        what: str = "its smallest form",
    ):
        self.structure = structure
        self.needed = needed
        self.budget = weight_budget(input_dim, output_dim, nb_params_share)
        self.min_share = smallest_share(needed, input_dim, output_dim)
        if needed > input_dim * output_dim:
            advice = "no share does for these dimensions; use a larger layer or another structure"
        else:
            advice = f"use nb_params_share >= {self.min_share:g}"
        super().__init__(
            f"nb_params_share={nb_params_share:g} allows {self.budget} weight parameters for a "
            f"{output_dim} x {input_dim} (output_dim x input_dim) '{structure}' layer, but "
            f"{what} needs {needed}; {advice}"
        )


def _as_float64_tensor(name: str, value: object, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    elif isinstance(value, np.ndarray):
        tensor = None
    else:
        raise TypeError(
            f"{name} must be a numpy array or torch tensor of shape {shape} ({what}), "
            f"got {_describe(value)}"
        )
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got shape {tuple(value.shape)}")
    if tensor is None:
        if value.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
        # A copy: ascontiguousarray keeps an empty view's negative strides, which torch refuses.
        tensor = torch.from_numpy(np.array(value, dtype=np.float64, order="C", copy=True))
    else:
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
        tensor = tensor.to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} must be finite, but {bad} of its entries are NaN or infinite")
    return tensor.clone()


def as_matrix(
    name: str, value: object, rows: int, cols: int, what: str = "output_dim x input_dim"
) -> torch.Tensor:
    """Check a real, finite matrix argument; return it as a new float64 CPU tensor (rows, cols).

    ``what`` says in words what the shape means, for the error message.
    """
    return _as_float64_tensor(name, value, (rows, cols), what)


def as_vector(name: str, value: object, length: int, what: str = "output_dim") -> torch.Tensor:
    """Check a real, finite vector argument; return it as a new float64 CPU tensor (length,)."""
    return _as_float64_tensor(name, value, (length,), what)
