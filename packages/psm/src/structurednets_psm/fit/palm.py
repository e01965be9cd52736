"""PALM (proximal alternating linearised minimisation) on ``target ~ lam * S_1 ... S_J``.

Each sweep updates one factor at a time by a projected gradient step whose step size is the
inverse Lipschitz constant of that factor's gradient,
``1 / (1.001 * lam^2 * ||L||_2^2 * ||R||_2^2)`` (``L``, ``R`` the products left and right of
it; spectral norms by warm-started power iterations), then sets ``lam`` to its least-squares
value. Everything is float64 on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from structurednets.plugin import relative_error
from structurednets_psm.fit.projections import project

__all__ = [
    "DTYPE",
    "EXACT",
    "Numerics",
    "PALMState",
    "chain_product",
    "identity",
    "least_squares_scale",
    "palm_sweeps",
]

_LIPSCHITZ_MARGIN = 1.001
EXACT = 1e-10  # relative error below which a factorisation counts as exact
DTYPE = torch.float64


class Numerics:
    """Squared spectral norms by power iteration, warm-started per key, and the fixed random
    priorities that break ties in global projections (seeded: results depend on the seed)."""

    def __init__(self, generator: torch.Generator, iterations: int):
        self.generator = generator
        self.iterations = iterations
        self.vectors: dict[object, torch.Tensor] = {}
        self.priorities: dict[tuple[int, int], torch.Tensor] = {}

    def priority(self, shape: tuple[int, int]) -> torch.Tensor:
        """A random permutation of ``0 .. rows * cols - 1`` as a float tensor of ``shape``.

        Exact ties are common in structured targets (a Toeplitz matrix is constant along its
        diagonals); breaking them towards the lower index would favour the top rows, which
        measurably hurts (64 x 64 Toeplitz-like matrix: 0.0119 vs 0.0105 after 1000 sweeps).
        """
        shape = (int(shape[0]), int(shape[1]))
        if shape not in self.priorities:
            order = torch.randperm(shape[0] * shape[1], generator=self.generator)
            self.priorities[shape] = order.to(DTYPE).reshape(shape)
        return self.priorities[shape]

    def squared(self, matrix: torch.Tensor | None, key: object) -> float:
        """``||matrix||_2^2`` by power iteration warm-started from the last vector of ``key``
        (1 for ``None``, the identity)."""
        if matrix is None:
            return 1.0
        return self._power(
            lambda v: matrix.T @ (matrix @ v),
            lambda v: float(torch.linalg.norm(matrix @ v)) ** 2,
            matrix.shape[1],
            key,
        )

    def largest_eigenvalue(self, gram: torch.Tensor, key: object) -> float:
        """The largest eigenvalue of the symmetric positive semi-definite ``gram`` (``||M||_2^2``
        for ``gram = M M^T``) by power iteration warm-started from the last vector of ``key``."""
        return self._power(lambda v: gram @ v, lambda v: float(v @ (gram @ v)), gram.shape[0], key)

    def _power(self, apply, value, size: int, key: object) -> float:
        """Power iteration with ``apply`` (the symmetric operator); ``value`` of the final
        unit vector is the estimate (one product with ``matrix`` for :meth:`squared`)."""
        vector = self.vectors.get(key)
        iterations = self.iterations
        if vector is None or vector.shape[0] != size:
            vector = torch.randn(size, dtype=DTYPE, generator=self.generator)
            iterations = 3 * self.iterations
        for _ in range(iterations):
            image = apply(vector)
            norm = torch.linalg.norm(image)
            if norm == 0:
                return 0.0
            vector = image / norm
        self.vectors[key] = vector
        return value(vector)


def chain_product(matrices: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``M_1 @ M_2 @ ...`` left to right; ``None`` for no matrices."""
    result = None
    for matrix in matrices:
        result = matrix if result is None else result @ matrix
    return result


@dataclass
class PALMState:
    """Factors, supports and scale of one PALM problem ``target ~ lam * prod(factors)``."""

    target: torch.Tensor
    factors: list[torch.Tensor]
    supports: list[torch.Tensor]
    nonzeros: list[int]
    projections: list[str]
    lam: float = 1.0
    approximation: torch.Tensor | None = None  # prod(factors), kept between sweeps
    block: int = 1  # side of the support blocks

    def error(self) -> float:
        """``||target - lam * prod(factors)||_F / ||target||_F``."""
        product = self.approximation
        if product is None:
            product = chain_product(self.factors)
        return relative_error(self.lam * product, self.target)


def least_squares_scale(target: torch.Tensor, product: torch.Tensor, otherwise: float) -> float:
    """The ``lam`` minimising ``||target - lam * product||_F``; ``otherwise`` if ``product``
    is zero."""
    squared = float((product * product).sum())
    return float((target * product).sum()) / squared if squared > 0 else otherwise


def identity(rows: int, cols: int) -> torch.Tensor:
    """The ``rows x cols`` float64 identity."""
    return torch.eye(rows, cols, dtype=DTYPE)


def palm_sweeps(
    state: PALMState,
    nb_sweeps: int,
    update_way: str,
    norms: Numerics,
    key: object,
    continuation: float = 1.0,
) -> int:
    """Run up to ``nb_sweeps`` PALM sweeps on ``state`` in place; stop early once the
    approximation is exact (at the final sparsity). Returns the factor updates done."""
    target, factors, count = state.target, state.factors, len(state.factors)
    left_to_right = update_way == "left_to_right"
    order = range(count) if left_to_right else range(count - 1, -1, -1)
    tightening = max(1, math.ceil(0.7 * nb_sweeps))
    for sweep in range(nb_sweeps):
        factor = continuation ** max(0.0, 1.0 - sweep / tightening) if continuation > 1 else 1.0
        if sweep == nb_sweeps - 1:
            factor = 1.0  # a run always ends at the final sparsity (a short run too)
        # Products on the side not yet updated in this sweep.
        if left_to_right:
            fixed = [chain_product(factors[j + 1 :]) for j in range(count)]
        else:
            fixed = [chain_product(factors[:j]) for j in range(count)]
        moving = None  # product of the factors already updated in this sweep
        for position, j in enumerate(order):
            left, right = (moving, fixed[j]) if left_to_right else (fixed[j], moving)
            lam = state.lam
            c = _LIPSCHITZ_MARGIN * lam * lam
            c *= norms.squared(left, (key, j, "left")) * norms.squared(right, (key, j, "right"))
            if c <= 0 or not math.isfinite(c):
                c = 1.0
            if position == 0 and state.approximation is not None:
                full = state.approximation
            else:
                full = factors[j] if left is None else left @ factors[j]
                full = full if right is None else full @ right
            residual = lam * full - target
            if left is not None and right is not None:
                if left.shape[0] * right.shape[0] <= left.shape[1] * right.shape[1]:
                    gradient = (left.T @ residual) @ right.T
                else:
                    gradient = left.T @ (residual @ right.T)
            elif left is not None:
                gradient = left.T @ residual
            elif right is not None:
                gradient = residual @ right.T
            else:
                gradient = residual
            k = min(round(state.nonzeros[j] * factor), factors[j].numel())
            kind, block = state.projections[j], state.block
            rows, cols = factors[j].shape
            priority = norms.priority((rows // block, cols // block)) if kind == "global" else None
            factors[j], state.supports[j] = project(
                factors[j] - (lam / c) * gradient, k, kind, priority, block
            )
            if left_to_right:
                moving = factors[j] if moving is None else moving @ factors[j]
            else:
                moving = factors[j] if moving is None else factors[j] @ moving
        state.approximation = moving
        state.lam = least_squares_scale(target, moving, state.lam)
        if factor == 1.0 and state.error() <= EXACT:
            return (sweep + 1) * count
    return nb_sweeps * count
