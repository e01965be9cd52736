"""The mixed-precision policy of every structured layer, and the slow-path warning.

Under ``torch.autocast`` a :class:`~structurednets.StructuredLayer` does what ``nn.Linear``
does: its products run in the autocast dtype (``torch.get_autocast_dtype``) and it returns a
tensor of that dtype, while its parameters and their gradients keep their own dtype.
:meth:`StructuredLayer.forward` implements it once for every structure:

1. autocast is switched off for the layer's own operations;
2. the input and every floating-point parameter and buffer are cast to the autocast dtype
   (differentiable casts: the gradients reach the float32 parameters in float32);
3. the usual forward (``multiply``, then the bias) runs on the cast tensors, with the cast
   tensors swapped in for the layer's own (as ``torch.func.functional_call`` swaps them);
   ``torch.compile`` traces it without graph breaks.

A layer whose parameters are float64 ignores autocast, as ``nn.Linear`` does (autocast never
casts float64 tensors). A structure whose ``multiply`` needs more precision in one step (a
long recursion, a state update) names the tensors that stay in their own dtype in the class
attribute ``autocast_full_precision``; its ``multiply`` then sees the input in the autocast
dtype and those tensors in theirs, runs that step in :func:`accumulation_dtype` and returns
the autocast dtype.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

__all__ = [
    "REDUCED_DTYPES",
    "SlowFallbackWarning",
    "accumulation_dtype",
    "autocast_dtype",
    "autocast_off",
    "cast_for_autocast",
    "reset_slow_fallback_warnings",
    "run_under_autocast",
    "warn_slow_fallback",
]

#: The floating dtypes of less than 32 bits, in which sums are better accumulated in float32.
REDUCED_DTYPES = (torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on ``device_type`` ("cpu", "cuda", ...) when autocast is on there,
    else ``None`` (also for devices without autocast, such as "meta")."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate a recursion or a long sum in when computing in ``dtype``:
    float32 for float16 and bfloat16, ``dtype`` itself otherwise."""
    return torch.float32 if dtype in REDUCED_DTYPES else dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device_type`` (nothing to do on devices without
    autocast); for kernels that must run in their operands' dtype, e.g. in a backward pass
    that runs under autocast."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def cast_for_autocast(
    module: nn.Module, dtype: torch.dtype, keep: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Every floating-point parameter and buffer of ``module`` cast to ``dtype`` (by
    differentiable casts), by name, except those named in ``keep`` (exact names, or a prefix
    ending in ".") and those already of ``dtype``."""
    keep = tuple(keep)
    cast: dict[str, torch.Tensor] = {}
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            continue
        if name in keep or any(prefix.endswith(".") and name.startswith(prefix) for prefix in keep):
            continue
        cast[name] = tensor.to(dtype)
    return cast


def run_under_autocast(
    layer: nn.Module, U: torch.Tensor, dtype: torch.dtype, forward: Callable
) -> torch.Tensor:
    """``forward(U)`` with autocast off, ``U`` and ``layer``'s tensors cast to ``dtype`` (see
    the module docstring); ``forward`` is the layer's autocast-free forward."""
    cast = cast_for_autocast(layer, dtype, getattr(layer, "autocast_full_precision", ()))
    with torch.autocast(U.device.type, enabled=False), _reparametrize_module(layer, cast):
        return forward(U.to(dtype))


class SlowFallbackWarning(UserWarning):
    """A structure runs a path much slower than its intended kernels (e.g. on a device or in
    a dtype its kernels do not support)."""


_warned: set[str] = set()


def warn_slow_fallback(structure: str, reason: str) -> None:
    """Warn once per process and structure that ``structure`` runs a slow path, and why.

    Call it outside ``torch.compile``d code (e.g. inside a custom operator) or where the
    decision is made once (layer construction, first call).
    """
    if structure in _warned:
        return
    _warned.add(structure)
    warnings.warn(
        f"structure '{structure}' runs a slow path: {reason}", SlowFallbackWarning, stacklevel=3
    )


def reset_slow_fallback_warnings() -> None:
    """Forget which structures were warned about (for tests)."""
    _warned.clear()
