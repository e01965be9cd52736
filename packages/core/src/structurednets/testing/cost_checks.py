"""Checks of the cost a structure reports for its layouts."""

from __future__ import annotations

import structurednets
from structurednets.cost import Cost, dense_cost
from structurednets.testing.case import ConformanceCase
from structurednets.testing.layout_checks import fitted_layers


def check_cost_is_reported(case: ConformanceCase) -> None:
    """Every layer (random or fitted) reports a :class:`~structurednets.Cost` from its layout:
    non-negative integer multiply-adds, the same for a layer rebuilt from the layout, growing
    with the batch, and ``cost_ratio`` against ``nn.Linear``'s :func:`dense_cost`."""
    for layer in fitted_layers(case):
        cost = layer.cost(64)
        assert isinstance(cost, Cost), f"cost() gave a {type(cost).__name__}, not a Cost"
        assert cost.forward > 0 and cost.backward > 0, f"{cost} is not a positive count"
        twin = structurednets.create(case.structure, layout=layer.layout)
        assert twin.cost(64) == cost, "a layer rebuilt from the layout reports another cost"
        bigger = layer.cost(4 * 64)
        assert bigger.forward > cost.forward and bigger.backward > cost.backward, (
            f"cost does not grow with the batch: {cost} at 64, {bigger} at 256"
        )
        assert bigger.total <= 4 * cost.total, "cost grows faster than the batch"
        dense = dense_cost(layer.input_dim, layer.output_dim, 256)
        assert abs(layer.cost_ratio() - bigger.ratio(dense)) < 1e-12
