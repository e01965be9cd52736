"""Global allocation: spread a model's weight budget over its layers where it keeps the most.

``compress(..., allocation="global")`` gives the selected layers together
``share * sum(in * out)`` weights, like the uniform share, but lets each layer take more or
less than ``share`` of its own. It minimises ``sum_l s_l * e_l**2``, where ``e_l`` is layer
``l``'s relative error (in the output norm with calibration, ``||(W - W~) X^T|| / ||W X^T||``
on its inputs, else in the weight norm) and ``s_l`` its sensitivity: with calibration, how
much the model's output moves per unit of ``e_l**2``
(:func:`~structurednets.calibration_hooks.output_sensitivities`, a first-order estimate from
one backward per batch), so that the sum estimates the squared change of the model's outputs
when the layers' errors are independent; without calibration every ``s_l`` is 1. The plain
sum of relative errors is not enough: on all-MiniLM-L6-v2 it starves the feed-forward
layers, whose relative errors are small but whose outputs feed the residual stream at full
weight, and loses to the uniform share (mean embedding cosine 0.582 against 0.626 at share
0.25); weighted, it wins (0.660).

Each layer's curve (weights against squared error) comes from
:meth:`~structurednets.StructuredLayer.error_curve` where the structure can tell it without
fitting (low rank: the singular values of the whitened weight give every rank at once), and
otherwise from fits at a few shares around ``share`` (:data:`GRID_FACTORS`), which are kept
so that the chosen one is not fitted twice. The choice is the greedy solution of the
multiple-choice knapsack on each curve's lower convex hull: every layer starts at its
smallest form, and the step with the largest error decrease per weight that still fits the
budget is taken until none does.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from structurednets.approximation import Approximation
from structurednets.calibration import InputStatistics
from structurednets.registry import get_structure

__all__ = [
    "GRID_FACTORS",
    "Allocation",
    "Candidate",
    "allocate",
    "allocate_layers",
    "curve_candidates",
    "share_for_weights",
]

#: Shares, as multiples of the uniform share, at which structures without a closed-form
#: curve are fitted (clipped to ``[min_share, max_share]``).
GRID_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Candidate:
    """One form a layer may take: ``structure`` with ``nb_weights`` weight scalars, fitted
    at ``nb_params_share`` with ``squared_error``; ``fitted`` keeps the fit where one was
    made for the curve (``None`` for points of a closed-form curve)."""

    structure: str
    nb_weights: int
    squared_error: float
    nb_params_share: float
    fitted: Approximation | None = None


def share_for_weights(nb_weights: int, input_dim: int, output_dim: int) -> float:
    """A share whose budget (``floor(share * in * out)``) is exactly ``nb_weights``."""
    return min(1.0, (nb_weights + 0.5) / (input_dim * output_dim))


def squared_error(result: Approximation) -> float:
    """The squared relative error the allocation minimises: output error with calibration."""
    error = result.output_relative_error
    return float(result.relative_error if error is None else error) ** 2


def curve_candidates(
    weight: torch.Tensor,
    name: str,
    statistics: InputStatistics | None,
    min_share: float,
    max_share: float,
) -> list[Candidate] | None:
    """The structure's closed-form curve between the two shares, or ``None`` if it has none."""
    output_dim, input_dim = weight.shape
    layer_class = get_structure(name).layer_class
    low = int(min_share * input_dim * output_dim * (1 - 1e-12))
    high = int(max_share * input_dim * output_dim * (1 + 1e-12))
    points = layer_class.error_curve(weight.detach().to(torch.float64), statistics, high)
    if points is None:
        return None
    return [
        Candidate(name, count, float(error), share_for_weights(count, input_dim, output_dim))
        for count, error in points
        if low <= count <= high
    ]


def grid_shares(share: float, min_share: float, max_share: float) -> list[float]:
    """The shares of :data:`GRID_FACTORS` around ``share``, clipped and without repeats."""
    shares = {min(max(share * factor, min_share), max_share) for factor in GRID_FACTORS}
    return sorted(shares)


def _hull(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The lower convex hull of (weights, squared error), from the smallest form on: the
    forms worth taking, each with a smaller error than the one before at a falling rate."""
    points = sorted(candidates, key=lambda c: (c.nb_weights, c.squared_error))
    hull: list[Candidate] = []
    for point in points:
        if hull and point.squared_error >= hull[-1].squared_error:
            continue  # more weights, no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment from a to the new point
            left = (b.squared_error - a.squared_error) * (point.nb_weights - a.nb_weights)
            right = (point.squared_error - a.squared_error) * (b.nb_weights - a.nb_weights)
            if left >= right:
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def allocate(
    curves: Sequence[Sequence[Candidate]], budget: int
) -> tuple[list[Candidate | None], int]:
    """One candidate per layer (``None``: stays dense) whose weights sum to at most
    ``budget``, minimising the summed squared errors (greedy on the convex hulls).

    Every layer with candidates starts at its smallest form; when those alone exceed the
    budget, the layers with the largest smallest forms stay dense until the rest fit.
    Returns the choices and the weights they hold.
    """
    hulls = [_hull(curve) if curve else [] for curve in curves]
    position = [0 if hull else None for hull in hulls]
    used = sum(hull[0].nb_weights for hull in hulls if hull)
    by_size = sorted(
        (i for i, hull in enumerate(hulls) if hull), key=lambda i: -hulls[i][0].nb_weights
    )
    for i in by_size:
        if used <= budget:
            break
        used -= hulls[i][0].nb_weights
        position[i] = None
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        step = position[i]
        if step is not None and step + 1 < len(hulls[i]):
            here, there = hulls[i][step], hulls[i][step + 1]
            rate = (here.squared_error - there.squared_error) / (there.nb_weights - here.nb_weights)
            heapq.heappush(heap, (-rate, i))

    for i in range(len(hulls)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        step = position[i]
        extra = hulls[i][step + 1].nb_weights - hulls[i][step].nb_weights
        if used + extra > budget:
            continue  # this layer's next step does not fit; others' smaller steps may
        position[i] = step + 1
        used += extra
        push(i)
    choices = [None if p is None else hulls[i][p] for i, p in enumerate(position)]
    return choices, used


def layer_candidates(
    weight: torch.Tensor,
    names: Sequence[str],
    share: float,
    min_share: float,
    max_share: float,
    statistics: InputStatistics | None,
    fit: Callable[[str, float], Approximation | None],
) -> list[Candidate]:
    """Every form of every structure in ``names`` that the allocation may give the layer:
    closed-form curves where a structure has one, else ``fit(name, share)`` at the grid
    shares (``None``: that share does not fit)."""
    candidates: list[Candidate] = []
    for name in names:
        closed = curve_candidates(weight, name, statistics, min_share, max_share)
        if closed is not None:
            candidates += closed
            continue
        for each in grid_shares(share, min_share, max_share):
            result = fit(name, each)
            if result is not None:
                weights = result.layer.nb_weight_parameters
                candidates.append(Candidate(name, weights, squared_error(result), each, result))
    return candidates


@dataclass(frozen=True)
class Allocation:
    """What the global allocation chose: per layer name, a :class:`Candidate` or the reason
    it stays dense; the budget and the weights chosen."""

    choices: dict[str, Candidate]
    kept_dense: dict[str, str]
    budget: int
    nb_weights: int


def allocate_layers(
    layers: Sequence[tuple[str, torch.Tensor]],
    names: Sequence[str],
    share: float,
    min_share: float,
    max_share: float,
    statistics: dict[str, InputStatistics],
    fit: Callable[[str, str, float], Approximation | None],
    progress: Callable[[str], None],
    sensitivities: dict[str, float] | None = None,
) -> Allocation:
    """Candidates for every ``(layer name, weight)``, then :func:`allocate` within ``share``
    of the weights of the layers that have a candidate. ``fit(layer, structure, share)``
    fits one form (``None``: it does not exist). With ``sensitivities`` (by layer name),
    each layer's squared errors count that many times in the sum."""
    curves, kept_dense = [], {}
    for index, (layer, weight) in enumerate(layers, start=1):
        curve = layer_candidates(
            weight,
            names,
            share,
            min_share,
            max_share,
            statistics.get(layer),
            lambda name, each, layer=layer: fit(layer, name, each),
        )
        curves.append(curve)
        if not curve:
            kept_dense[layer] = (
                f"no form of {', '.join(names)} fits between min_share={min_share:g} and "
                f"max_share={max_share:g}"
            )
        progress(f"[allocation {index}/{len(layers)}] {layer or '(model)'}: {len(curve)} forms")
    budget = math.floor(
        share * sum(w.numel() for (_, w), c in zip(layers, curves, strict=True) if c) * (1 + 1e-12)
    )
    if sensitivities is not None:
        curves = [
            [replace(c, squared_error=c.squared_error * sensitivities[layer]) for c in curve]
            for (layer, _), curve in zip(layers, curves, strict=True)
        ]
    chosen, used = allocate(curves, budget)
    choices = {}
    for (layer, _), curve, choice in zip(layers, curves, chosen, strict=True):
        if choice is not None:
            choices[layer] = choice
        elif curve:
            smallest = min(c.nb_weights for c in curve)
            kept_dense[layer] = (
                f"the smallest forms of all layers exceed the budget of {budget} weights; "
                f"this layer's ({smallest} weights) was among the largest"
            )
    return Allocation(choices, kept_dense, budget, used)
