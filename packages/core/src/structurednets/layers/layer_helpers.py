"""Helpers that work on any ``nn.Module``; kept at the path users of MatthiasKi/structurednets 1.0 know."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["default_dtype", "get_nb_model_parameters"]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default floating-point dtype (the dtype new layers get).

    The setting is process-wide: do not build layers from several threads meanwhile.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def get_nb_model_parameters(model: nn.Module, count_gradientless_parameters: bool = True) -> int:
    """Number of scalars in the parameters of ``model``; a sparse tensor counts its stored values.

    Args:
        model: any module.
        count_gradientless_parameters: also count parameters with ``requires_grad=False``.
    """
    total = 0
    for param in model.parameters():
        if param.requires_grad or count_gradientless_parameters:
            total += param._nnz() if param.is_sparse else param.numel()
    return total
