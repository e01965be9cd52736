"""What the conformance kit knows about a structure, and helpers the checks share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import structurednets
from structurednets.layers.layer_helpers import default_dtype
from structurednets.layers.structured_layer import StructuredLayer
from structurednets.numerics import relative_error, torch_threads

__all__ = [
    "Check",
    "CheckSkipped",
    "ConformanceCase",
    "assert_same_outputs",
    "default_dtype",
    "inputs",
    "raises",
    "relative_error",
    "skip",
]

DEFAULT_SHAPES = ((16, 16), (24, 10), (10, 24), (13, 7), (7, 13), (31, 17), (1, 9), (9, 1))
DEFAULT_SHARES = (0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class ConformanceCase:
    """What the kit needs to know about one structure.

    Args:
        structure: the registered name.
        options: structure options passed to every layer the kit builds.
        shape: ``(input_dim, output_dim)`` of the layers most checks build; not square,
            so that a transposed weight matrix is caught.
        share: their ``nb_params_share``.
        shapes, shares: the grid on which the budget and parameter counts are checked.
        gradcheck_shape, gradcheck_share: the (small) layer ``torch.autograd.gradcheck`` sees.
        adam_lr, sgd_lr, nb_train_steps: the short training runs that must reduce a loss.
        skip: check names mapped to the reason the structure cannot pass them.
        compile_backend: the ``torch.compile`` backend of the compile check ("aot_eager"
            traces forward and backward without code generation; "inductor" is slower).
        max_graph_breaks: graph breaks under ``torch.compile`` the structure may cause
            (say why in the test when it is not 0).
        option_strategies: hypothesis strategies per structure option, drawn by the
            property-based check, e.g. ``{"rank": st.integers(1, 4)}``.
    """

    structure: str
    options: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, int] = (24, 16)
    share: float = 0.5
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES
    shares: tuple[float, ...] = DEFAULT_SHARES
    gradcheck_shape: tuple[int, int] = (7, 5)
    gradcheck_share: float = 0.8
    adam_lr: float = 1e-2
    sgd_lr: float = 5e-2
    nb_train_steps: int = 30
    skip: dict[str, str] = field(default_factory=dict)
    compile_backend: str = "aot_eager"
    max_graph_breaks: int = 0
    option_strategies: dict[str, Any] = field(default_factory=dict)

    def build(
        self,
        input_dim: int | None = None,
        output_dim: int | None = None,
        share: float | None = None,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> StructuredLayer:
        """A layer of this structure, built through ``structurednets.create`` under a seed."""
        input_dim = self.shape[0] if input_dim is None else input_dim
        output_dim = self.shape[1] if output_dim is None else output_dim
        share = self.share if share is None else share
        torch.manual_seed(seed)
        with default_dtype(dtype):
            return structurednets.create(
                self.structure, input_dim, output_dim, share, **{**self.options, **kwargs}
            )


class CheckSkipped(Exception):
    """A check that does not apply here (no GPU, a listed skip); the message says why."""


def skip(reason: str) -> None:
    """Stop the running check as skipped."""
    raise CheckSkipped(reason)


@dataclass(frozen=True)
class Check:
    """One named conformance check.

    Calling it with a :class:`ConformanceCase` runs it under pytest (a skip becomes a pytest
    skip); :meth:`run` raises :class:`CheckSkipped` instead.
    """

    name: str
    function: Callable[[ConformanceCase], None]

    def run(self, case: ConformanceCase) -> None:
        """Run the check with one torch thread; raises AssertionError or CheckSkipped."""
        if self.name in case.skip:
            skip(f"{case.structure}: {case.skip[self.name]}")
        with torch_threads(1):  # small problems; a second thread only adds contention
            self.function(case)

    def __call__(self, case: ConformanceCase) -> None:
        try:
            self.run(case)
        except CheckSkipped as skipped:
            import pytest

            pytest.skip(str(skipped))

    def __str__(self) -> str:
        return self.name


@contextlib.contextmanager
def raises(
    exception: type[BaseException] | tuple[type[BaseException], ...], *fragments: str
) -> Iterator[None]:
    """Like ``pytest.raises``; also asserts that each fragment occurs in the message."""
    try:
        yield
    except exception as error:
        message = str(error)
        for fragment in fragments:
            assert fragment in message, (
                f"{type(error).__name__} message should mention {fragment!r}: {message!r}"
            )
    else:
        raise AssertionError(f"expected {exception} mentioning {fragments}, nothing was raised")


def inputs(layer: StructuredLayer, *batch_shape: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    dtype = next(layer.parameters()).dtype
    return torch.randn(*batch_shape, layer.input_dim, generator=generator, dtype=dtype)


def assert_same_outputs(first: StructuredLayer, second: StructuredLayer, what: str) -> None:
    U = inputs(first, 5)
    with torch.no_grad():
        assert torch.equal(first(U), second(U)), f"{what} changed the layer's outputs"
