"""The one L-BFGS runner of the LDR fit: the operator descent and the refinement use it."""

from __future__ import annotations

import time

import torch

__all__ = ["minimise", "refine"]


class _Stop(Exception):
    """Ends an L-BFGS run from inside its closure (time limit, tolerance, non-finite loss)."""


def minimise(
    objective,
    start,
    *,
    budget: int,
    history_size: int,
    tolerance_grad: float,
    tolerance_change: float,
    deadline: float,
    stop_at: float = float("-inf"),
):
    """L-BFGS (strong Wolfe) on ``objective(*parameters) -> (value, loss)`` from ``start``,
    minimising ``loss`` and keeping the parameters of the smallest ``value``; stops at
    ``deadline``, at a non-finite value or one ``<= stop_at``.

    Returns ``(best value, best parameters, evaluations)``.
    """
    parameters = [t.detach().clone().requires_grad_(True) for t in start]
    optimiser = torch.optim.LBFGS(
        parameters,
        lr=1.0,
        max_iter=budget,
        max_eval=budget,
        history_size=history_size,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        line_search_fn="strong_wolfe",
    )
    best = [float("inf"), [t.detach().clone() for t in parameters]]
    evaluations = [0]

    def closure() -> torch.Tensor:
        if time.perf_counter() > deadline:
            raise _Stop
        optimiser.zero_grad()
        value_tensor, loss = objective(*parameters)
        value = float(value_tensor.detach())
        evaluations[0] += 1
        if value < best[0]:
            best[0] = value
            best[1] = [t.detach().clone() for t in parameters]
        if value <= stop_at or not value < float("inf"):
            raise _Stop
        loss.backward()
        return loss

    try:
        with torch.enable_grad():
            optimiser.step(closure)
    except (_Stop, torch.linalg.LinAlgError):
        pass
    return best[0], best[1], evaluations[0]


def refine(relative_error, start, budget: int, tolerance: float, deadline: float):
    """L-BFGS on the squared relative error; returns ``(error, parameters, evaluations)``."""

    def objective(*parameters):
        error = relative_error(*parameters)
        return error, error * error

    return minimise(
        objective,
        start,
        budget=budget,
        history_size=30,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        deadline=deadline,
        stop_at=tolerance,
    )
