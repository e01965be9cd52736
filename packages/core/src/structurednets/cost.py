"""What a layer's forward and backward cost, counted from its layout (no timing).

A cost is a count of multiply-adds for a batch of ``batch_size`` inputs: what the structure's
kernels do, so that choices between structures and layouts can be bounded by speed as well as
by error. ``structurednets bench`` prints measured time ratios beside the predicted ones, to
check that the counts are honest.

>>> from structurednets.cost import Cost, dense_cost
>>> dense_cost(512, 256, 8)
Cost(forward=1048576, backward=2097152)
>>> Cost(150, 300).ratio(dense_cost(10, 10, 3))  # half the dense multiply-adds
0.5
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_COST_BATCH_SIZE", "Cost", "dense_cost"]

#: The batch size the cost ratios in reports and bounds are taken at.
DEFAULT_COST_BATCH_SIZE = 256


@dataclass(frozen=True)
class Cost:
    """Multiply-adds of one call.

    Attributes:
        forward: of ``forward`` (the bias left out, as for the dense layer).
        backward: of the backward pass with the input's gradient as well as the parameters'
            (a hidden layer's); for a dense layer twice the forward.
    """

    forward: int
    backward: int

    def __post_init__(self) -> None:
        for name in ("forward", "backward"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Cost.{name} must be a non-negative int, got {value!r}")

    @property
    def total(self) -> int:
        """Forward plus backward: a training step's multiply-adds."""
        return self.forward + self.backward

    def ratio(self, other: Cost) -> float:
        """``self.total / other.total`` (e.g. against :func:`dense_cost`)."""
        return self.total / other.total if other.total else float("inf")

    def forward_ratio(self, other: Cost) -> float:
        """``self.forward / other.forward``: the inference cost ratio."""
        return self.forward / other.forward if other.forward else float("inf")

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.forward + other.forward, self.backward + other.backward)


def dense_cost(input_dim: int, output_dim: int, batch_size: int) -> Cost:
    """``nn.Linear``'s cost: ``batch * in * out`` forward, twice that backward."""
    forward = batch_size * input_dim * output_dim
    return Cost(forward, 2 * forward)
