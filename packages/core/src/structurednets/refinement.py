"""The generic calibrated fit every structure can fall back on, and how a plugin opts out of it.

Starting from a layer fitted to ``W``, :func:`refine_to_inputs` minimises the damped output
error ``||(W - W~) S||_F / ||W S||_F`` (``S`` the whitening factor of
:class:`~structurednets.calibration.InputStatistics`) over the layer's own weight parameters
with L-BFGS through :meth:`StructuredLayer.multiply`, and keeps the best point it evaluated:
the result is never worse than the start.

A layer class says what its constructor does with the keyword ``input_statistics=`` (an
:class:`~structurednets.calibration.InputStatistics`) through the class attribute
``input_weighting``:

- absent or ``None``: the constructor does not take it; core fits to ``W`` and refines;
- ``"weighted"``: the constructor's own fit uses the weighting; core refines from there;
- ``"optimal"``: the constructor's fit is the optimum of the weighted problem; no refinement.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from structurednets.calibration import InputStatistics
from structurednets.layers.structured_layer import StructuredLayer
from structurednets.validation import check_positive_int

__all__ = [
    "DEFAULT_REFINEMENT_ITERATIONS",
    "OPTIMAL",
    "WEIGHTED",
    "Refinement",
    "input_weighting",
    "refine_to_inputs",
]

WEIGHTED = "weighted"
OPTIMAL = "optimal"
#: L-BFGS iterations of :func:`refine_to_inputs` by default.
DEFAULT_REFINEMENT_ITERATIONS = 100


def input_weighting(layer_class: type) -> str | None:
    """The layer class's ``input_weighting`` (``None``, ``"weighted"`` or ``"optimal"``)."""
    value = getattr(layer_class, "input_weighting", None)
    if value not in (None, WEIGHTED, OPTIMAL):
        raise TypeError(
            f"{layer_class.__name__}.input_weighting must be None, {WEIGHTED!r} or "
            f"{OPTIMAL!r}, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class Refinement:
    """What :func:`refine_to_inputs` did.

    Attributes:
        start_error, error: damped relative output error before and after.
        evaluations: objective evaluations spent.
    """

    start_error: float
    error: float
    evaluations: int


def refine_to_inputs(
    layer: StructuredLayer,
    target: torch.Tensor,
    statistics: InputStatistics,
    *,
    max_iterations: int = DEFAULT_REFINEMENT_ITERATIONS,
) -> Refinement:
    """Lower ``layer``'s damped output error against ``target`` (``(output_dim, input_dim)``)
    in place; the bias and parameters with ``requires_grad=False`` are left alone.

    The objective ``||layer.multiply(S) - S W^T||_F^2 / ||S W^T||_F^2`` (``S`` symmetric) is
    minimised in float64 on a copy of the layer; the best evaluated point is copied back,
    so the error never rises. A non-finite objective ends the search.
    """
    max_iterations = check_positive_int("max_iterations", max_iterations)
    factor = statistics.whitening_factor()
    target = target.detach().to(device="cpu", dtype=torch.float64)
    original = layer._reference_parameter()
    work = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64)
    names = [
        name
        for name, parameter in work.named_parameters()
        if parameter.requires_grad and parameter is not work.bias
    ]
    parameters = [work.get_parameter(name) for name in names]
    whitened = factor @ target.T  # (S W^T), shape (input_dim, output_dim)
    norm = float((whitened * whitened).sum())
    scale = 1.0 / norm if norm > 0 else 1.0

    def objective() -> torch.Tensor:
        residual = work.multiply(factor) - whitened
        return (residual * residual).sum() * scale

    with torch.no_grad():
        start = float(objective())
    best = {"value": start, "point": [p.detach().clone() for p in parameters]}
    count = {"evaluations": 1}
    if parameters and start > 0 and math.isfinite(start):
        optimizer = torch.optim.LBFGS(
            parameters,
            lr=1.0,
            max_iter=max_iterations,
            history_size=20,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = objective()
            count["evaluations"] += 1
            number = float(value.detach())
            if not math.isfinite(number):
                raise FloatingPointError
            if number < best["value"]:
                best["value"] = number
                best["point"] = [p.detach().clone() for p in parameters]
            value.backward()
            return value

        try:
            optimizer.step(closure)
        except FloatingPointError:
            pass  # keep the best finite point
    with torch.no_grad():
        for name, point in zip(names, best["point"], strict=True):
            layer.get_parameter(name).copy_(point.to(device=original.device))
    return Refinement(math.sqrt(start), math.sqrt(best["value"]), count["evaluations"])
