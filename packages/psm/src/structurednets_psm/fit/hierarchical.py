"""The hierarchical factorisation: peel one sparse factor at a time off the left.

The residual ``T`` is split as ``T ~ S_l T'`` by a two-factor PALM (``T'`` projected onto as
many nonzeros as the product of the factors it stands for can have), then all factors found
so far and ``T'`` are refined together by a global PALM on the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from structurednets.plugin import relative_error
from structurednets_psm.fit.palm import (
    DTYPE,
    EXACT,
    Numerics,
    PALMState,
    chain_product,
    identity,
    least_squares_scale,
    palm_sweeps,
)
from structurednets_psm.fit.projections import project

__all__ = [
    "Factorization",
    "HierarchicalRun",
    "Strategy",
    "finish",
    "hierarchical_factorization",
]


@dataclass(frozen=True)
class Strategy:
    """One way to run the hierarchical factorisation.

    Attributes:
        nonzeros: ``k_j`` for each factor.
        projection: ``"global"`` (the ``k_j`` largest entries) or ``"rowcol"`` (the largest
            ``k_j / rows`` of each row together with the largest ``k_j / cols`` of each column;
            it finds butterfly supports such as Hadamard's). A row/column support that ends
            a start with more than ``k_j`` entries is cut to its ``k_j`` largest.
        update_way: ``"left_to_right"`` (new factor starts at 0, residual at the identity;
            factors updated left to right) or ``"right_to_left"`` (new factor starts at the
            identity, residual at 0; updated right to left).
        continuation: the projections first keep ``continuation`` times more entries and
            tighten geometrically to ``k_j`` over the first 70% of each PALM run (1: off).
    """

    nonzeros: tuple[int, ...]
    projection: str = "global"
    update_way: str = "left_to_right"
    continuation: float = 1.0


@dataclass
class Factorization:
    """The result of :func:`~structurednets_psm.fit_psm`.

    Attributes:
        factors: ``S_1, ..., S_J`` as dense float64 tensors, zero off their support, scaled
            so that their product approximates the target (no separate scalar) and their
            Frobenius norms are equal.
        supports: boolean masks of the supports (a support may hold zero values).
        relative_error: ``||X - S_1 ... S_J||_F / ||X||_F``.
        strategy: the strategy that won the search.
        nb_updates: PALM factor updates spent in total (all candidates); a sweep over
            ``J`` factors is ``J`` updates.
        tried: ``(strategy, relative error)`` of each candidate the search started.
    """

    factors: list[torch.Tensor]
    supports: list[torch.Tensor]
    relative_error: float
    strategy: Strategy
    nb_updates: int = 0
    tried: list[tuple[Strategy, float]] = field(default_factory=list)


def _residual_nonzeros(
    shapes: Sequence[tuple[int, int]], nonzeros: Sequence[int], level: int
) -> int:
    """Nonzeros allowed to the residual standing for ``S_{level+1} ... S_J``: its rows times
    the product of the mean nonzeros per row of those factors, at most its size."""
    rows = shapes[level + 1][0]
    cols = shapes[-1][1]
    per_row = 1.0
    for j in range(level + 1, len(shapes)):
        per_row *= nonzeros[j] / shapes[j][0]
    return int(min(rows * cols, max(1, round(rows * per_row))))


class HierarchicalRun:
    """One hierarchical factorisation under one strategy; can be refined further."""

    def __init__(
        self,
        target: torch.Tensor,
        shapes: Sequence[tuple[int, int]],
        strategy: Strategy,
        norms: Numerics,
        key: object,
        block: int = 1,
    ):
        self.target = target
        self.block = block
        self.shapes = list(shapes)
        self.strategy = strategy
        self.norms = norms
        self.key = key
        self.updates = 0  # factor updates done (the unit of the work budget)
        self.state: PALMState | None = None

    def start(self, sweeps_per_palm: int) -> None:
        """Peel the factors off one at a time (two PALM runs per level)."""
        strategy, shapes, count = self.strategy, self.shapes, len(self.shapes)
        kinds = [strategy.projection] * count
        nonzeros = list(strategy.nonzeros)
        if count == 1:
            matrix, support = project(self.target, nonzeros[0], kinds[0], block=self.block)
            self.state = PALMState(
                self.target, [matrix], [support], nonzeros, kinds, block=self.block
            )
            self.updates += palm_sweeps(
                self.state, sweeps_per_palm, strategy.update_way, self.norms, self.key
            )
            return
        residual_target = self.target
        peeled: list[torch.Tensor] = []
        supports: list[torch.Tensor] = []
        for level in range(count - 1):
            rows, cols = shapes[level][0], shapes[level][1]
            residual_shape = (cols, shapes[-1][1])
            residual_nonzeros = _residual_nonzeros(shapes, nonzeros, level)
            if strategy.update_way == "left_to_right":
                factor = torch.zeros(rows, cols, dtype=DTYPE)
                residual = identity(*residual_shape)
            else:
                factor = identity(rows, cols)
                residual = torch.zeros(residual_shape, dtype=DTYPE)
            local = PALMState(
                residual_target,
                [factor, residual],
                [factor != 0, residual != 0],
                [nonzeros[level], residual_nonzeros],
                [kinds[level], kinds[level]],
                block=self.block,
            )
            self.updates += palm_sweeps(
                local,
                sweeps_per_palm,
                strategy.update_way,
                self.norms,
                (self.key, "local", level),
                strategy.continuation,
            )
            peeled.append(local.factors[0])
            supports.append(local.supports[0])
            lam = local.lam  # the residual target already carries the previous scale
            if level == 0 and count == 2:
                # The first split of two factors is the whole problem: no global run needed.
                self.state = local
                return
            state = PALMState(
                self.target,
                [*peeled, local.factors[1]],
                [*supports, local.supports[1]],
                [*nonzeros[: level + 1], residual_nonzeros],
                kinds[: level + 2],
                lam=lam,
                block=self.block,
            )
            self.updates += palm_sweeps(
                state,
                sweeps_per_palm,
                strategy.update_way,
                self.norms,
                (self.key, "global", level),
                strategy.continuation,
            )
            peeled = state.factors[:-1]
            supports = state.supports[:-1]
            lam = state.lam
            residual_target = lam * state.factors[-1]
            self.state = state

    def enforce_budget(self) -> None:
        """Cut the supports that grew beyond their nonzeros (row/column projection) down to
        their largest entries, and project those factors globally from now on."""
        state = self.state
        over = [j for j, s in enumerate(state.supports) if int(s.sum()) > state.nonzeros[j]]
        block = state.block
        for j in over:
            state.projections[j] = "global"
            rows, cols = state.factors[j].shape
            priority = self.norms.priority((rows // block, cols // block))
            state.factors[j], state.supports[j] = project(
                state.factors[j], state.nonzeros[j], "global", priority, block
            )
        if over:
            product = chain_product(state.factors)
            state.lam = least_squares_scale(state.target, product, 1.0)
            state.approximation = product

    def refine(self, nb_sweeps: int, cycle_sweeps: int = 300, reheat: float = 1.5) -> None:
        """Up to ``nb_sweeps`` more global PALM sweeps on all factors, in cycles of
        ``cycle_sweeps`` whose projections first keep ``reheat`` times more entries and
        tighten back to the final sparsity (see :class:`Strategy`'s continuation): each
        cycle lets the supports move again. Keeps the best state seen; stops after two
        cycles without improvement, or once the factorisation is exact."""
        key = (self.key, "global", len(self.shapes))
        # Row/column projections may keep more than k_j entries; global ones keep exactly k_j.
        self.state.projections = ["global"] * len(self.state.factors)
        best_error, best = self.error(), self._snapshot()
        failures = 0
        while nb_sweeps > 0 and best_error > EXACT and failures < 2:
            length = min(cycle_sweeps, nb_sweeps)
            self.updates += palm_sweeps(
                self.state, length, self.strategy.update_way, self.norms, key, reheat
            )
            nb_sweeps -= length
            error = self.error()
            if error < (1.0 - 1e-4) * best_error:
                best_error, best, failures = error, self._snapshot(), 0
            else:
                failures += 1
        self._restore(best)

    def _snapshot(self) -> PALMState:
        state = self.state
        return replace(
            state,
            factors=[f.clone() for f in state.factors],
            supports=[s.clone() for s in state.supports],
            nonzeros=list(state.nonzeros),
            projections=list(state.projections),
        )

    def _restore(self, snapshot: PALMState) -> None:
        self.state = snapshot

    def error(self) -> float:
        return self.state.error()


def hierarchical_factorization(
    target: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    strategy: Strategy,
    sweeps_per_palm: int = 100,
    refine_sweeps: int = 0,
    seed: int = 0,
    power_iterations: int = 4,
    block_size: int = 1,
) -> Factorization:
    """One hierarchical PALM factorisation of ``target`` under ``strategy`` (no search)."""
    generator = torch.Generator().manual_seed(seed)
    norms = Numerics(generator, power_iterations)
    target = target.detach().to(device="cpu", dtype=DTYPE)
    run = HierarchicalRun(target, shapes, strategy, norms, 0, block_size)
    run.start(sweeps_per_palm)
    run.enforce_budget()
    run.refine(refine_sweeps)
    return finish(run, 0)


def finish(run: HierarchicalRun, nb_updates: int) -> Factorization:
    """Absorb ``lam`` into the factors and give them equal Frobenius norms."""
    state = run.state
    factors = [f.clone() for f in state.factors]
    norms = [float(torch.linalg.norm(f)) for f in factors]
    lam = state.lam
    if all(n > 0 for n in norms) and lam != 0:
        common = math.exp((math.log(abs(lam)) + sum(math.log(n) for n in norms)) / len(factors))
        factors = [f * (common / n) for f, n in zip(factors, norms, strict=True)]
        if lam < 0:
            factors[0] = -factors[0]
    else:
        factors[0] = factors[0] * lam
    supports = [s.clone() for s in state.supports]
    sizes = [int(s.sum()) for s in supports]
    if any(size > allowed for size, allowed in zip(sizes, state.nonzeros, strict=True)):
        raise RuntimeError(
            f"structurednets_psm bug: the fitted supports hold {sizes} nonzeros, more than the "
            f"{list(state.nonzeros)} allowed; please report it"
        )
    error = relative_error(chain_product(factors), state.target)
    return Factorization(factors, supports, error, run.strategy, nb_updates)
