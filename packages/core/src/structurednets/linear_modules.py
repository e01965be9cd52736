"""The modules ``compress`` can replace: ``nn.Linear``, and the ``Conv1D`` of GPT-2-style models.

``transformers``' ``Conv1D`` is a linear layer whose weight is stored transposed,
``(input_dim, output_dim)``; it is recognised by its name and attributes, so core needs no
``transformers`` import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LinearView", "linear_view", "tied_parameters"]


@dataclass(frozen=True)
class LinearView:
    """A module seen as ``y = x @ weight.T + bias``.

    Attributes:
        weight: ``(output_dim, input_dim)``, a view of the module's parameter (transposed for
            ``Conv1D``).
        bias: ``(output_dim,)`` or ``None``.
        input_dim, output_dim: the sizes.
        parameter: the module's weight parameter itself (for tie detection).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    parameter: nn.Parameter

    @property
    def input_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.weight.shape[0])


def _is_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def linear_view(module: nn.Module) -> LinearView | None:
    """The module as a linear layer, or ``None`` when ``compress`` must not replace it.

    Only modules whose type is exactly ``nn.Linear`` count: subclasses may use their weight
    elsewhere (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly).
    """
    if type(module) is nn.Linear:
        return LinearView(module.weight, module.bias, module.weight)
    if _is_conv1d(module):
        return LinearView(module.weight.T, module.bias, module.weight)
    return None


def tied_parameters(model: nn.Module) -> dict[int, list[str]]:
    """For every parameter used under more than one name: ``id(parameter) -> names``."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {key: value for key, value in names.items() if len(value) > 1}
