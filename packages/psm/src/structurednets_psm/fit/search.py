"""The search over strategies of the hierarchical factorisation, and its work budget.

Three modes (projection, update order and sparsity continuation) run first with equal
nonzeros per factor, then the best mode with other splits of the nonzeros; the winner is
refined in annealing cycles. The number of PALM sweeps follows from the matrix size, not
from the clock, so the result depends on the inputs and the seed only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from structurednets_psm.fit.hierarchical import (
    Factorization,
    HierarchicalRun,
    Strategy,
    finish,
)
from structurednets_psm.fit.least_squares import fill_supports, polish
from structurednets_psm.fit.palm import DTYPE, EXACT, Numerics
from structurednets_psm.layout import block_shapes, split_nonzeros

__all__ = ["PALMSettings", "Schedule", "candidate_splits", "run_search", "schedule"]


@dataclass(frozen=True)
class PALMSettings:
    """How much work :func:`~structurednets_psm.fit_psm` may do.

    Attributes:
        flop_budget: floating-point operations for the whole search and refinement; the
            number of PALM sweeps is this divided by the cost of one sweep, clamped to
            ``[min_sweeps, max_sweeps]``. The default keeps a 512 x 512 fit near 10 s on
            one busy core.
        min_sweeps, max_sweeps: bounds on the total number of PALM sweeps (a sweep updates
            every factor once; the budget is counted in factor updates).
        min_round_sweeps: the shortest run that ranks a candidate strategy; fewer candidates
            are tried when the budget cannot give each this many.
        power_iterations: warm-started power iterations per spectral-norm estimate.
        search: try several strategies; if False only the first candidate is run.
        polish_sweeps: exact least-squares sweeps on the values of the first and last
            factor with the supports fixed, after PALM (3 ended within 0.2% of 10 on the
            MiniLM weights, and 10 were 5 s of the 11 s 1536 x 384 fit).
        cycle_sweeps, reheat: the winner is refined in cycles of ``cycle_sweeps`` sweeps,
            each starting with ``reheat`` times more entries per factor and tightening back
            (the best state is kept). Measured on 64 x 64 and 128 x 128 Gaussian and
            Toeplitz-like targets, such cycles lower the error by 10-35% over plain sweeps.
        unstructured_error, unstructured_share: when the first two modes both end above
            ``unstructured_error`` (relative), the target is taken for one that no product of
            sparse factors fits closely (trained weights: 0.45-0.55 at share 0.25), so no
            further candidate is started and the whole fit gets ``unstructured_share`` of
            the work budget. On the 384 x 384 MiniLM query weight at share 0.25 that made the
            fit 4x faster (22 s to 5 s, one thread) for 5% more error (0.381 to 0.399);
            butterfly and sparse-product targets end the first modes far below it.
        threads: torch threads while fitting (restored afterwards); ``None`` keeps torch's
            setting. PALM is a long chain of medium-sized products that gains little from
            threads and slows down many times over when a core is shared (measured: a
            512 x 512 fit takes 8 s on one thread, 35-64 s on two threads of a busy
            two-core machine), so the default is 1.
    """

    flop_budget: float = 1.6e11
    min_sweeps: int = 40
    max_sweeps: int = 5000
    min_round_sweeps: int = 15
    power_iterations: int = 4
    search: bool = True
    polish_sweeps: int = 3
    cycle_sweeps: int = 300
    reheat: float = 1.5
    threads: int | None = 1
    unstructured_error: float = 0.1
    unstructured_share: float = 0.25


_MODES = (
    ("global", "left_to_right", 2.0),
    ("rowcol", "right_to_left", 1.0),
    ("global", "left_to_right", 1.0),
)


def candidate_splits(count: int) -> list[tuple[float, ...]]:
    """Relative nonzeros per factor tried by the search: equal; halving from the first factor
    to the last; doubling; everything to the first factor (the others keep one nonzero per
    row and column, e.g. a sparse matrix times a scaled permutation); everything to the last.
    """
    if count == 1:
        return [(1.0,)]
    tiny = 1e-9
    return [
        (1.0,) * count,
        tuple(2.0**-j for j in range(count)),
        tuple(2.0**j for j in range(count)),
        (1.0,) + (tiny,) * (count - 1),
        (tiny,) * (count - 1) + (1.0,),
    ]


def _sweep_flops(shapes: Sequence[tuple[int, int]]) -> float:
    """Rough floating-point operations of one PALM sweep on all factors."""
    rows, cols = shapes[0][0], shapes[-1][1]
    inner = max((r for r, _ in shapes[1:]), default=1)
    return 4.0 * len(shapes) * rows * cols * max(inner, 1)


class Search:
    """Candidate runs sharing one random state; counts the factor updates they spent."""

    def __init__(self, target, shapes, settings: PALMSettings, seed: int, block: int):
        self.target, self.shapes, self.settings, self.block = target, list(shapes), settings, block
        self.norms = Numerics(torch.Generator().manual_seed(seed), settings.power_iterations)
        self.runs: list[HierarchicalRun] = []
        self.tried: list[tuple[Strategy, float]] = []

    @property
    def spent(self) -> int:
        return sum(run.updates for run in self.runs)

    def start(self, strategy: Strategy, sweeps_per_palm: int) -> HierarchicalRun:
        run = HierarchicalRun(
            self.target, self.shapes, strategy, self.norms, len(self.runs), self.block
        )
        run.start(sweeps_per_palm)
        run.enforce_budget()
        self.runs.append(run)
        self.tried.append((strategy, run.error()))
        return run

    def best(self) -> HierarchicalRun:
        return min(self.runs, key=lambda run: run.error())


@dataclass(frozen=True)
class Schedule:
    """How the work budget is spent: the candidates tried and the sweeps of each PALM run.

    Attributes:
        modes: ``(projection, update_way, continuation)`` of the modes tried at the first split.
        splits: the splits of the nonzeros tried (the first with every mode, the others with
            the best mode).
        sweeps_per_palm: sweeps of each PALM run of a candidate.
        total_updates: factor updates of the whole fit (search and refinement).
    """

    modes: tuple[tuple[str, str, float], ...]
    splits: tuple[tuple[float, ...], ...]
    sweeps_per_palm: int
    total_updates: int


def schedule(
    shapes: Sequence[tuple[int, int]],
    splits: Sequence[tuple[float, ...]],
    settings: PALMSettings,
) -> Schedule:
    """The candidates and sweeps that ``settings``' work budget allows for these factors.

    Candidates are dropped (other splits first, then modes) until each PALM run of a start
    gets ``min_round_sweeps``; the first two modes are always tried (the second finds
    butterfly supports in a few sweeps), if need be with fewer sweeps.
    """
    count = len(shapes)
    # The work budget counts factor updates; a sweep updates every factor once.
    sweeps = settings.flop_budget / _sweep_flops(shapes)
    total = count * int(min(settings.max_sweeps, max(settings.min_sweeps, sweeps)))
    # Factor updates per sweep of every PALM run of one start: for J > 2, J - 1 local runs of
    # two factors and J - 1 global runs of 2, 3, ..., J factors.
    start_updates = 2 if count <= 2 else 2 * (count - 1) + (count - 1) * (count + 2) // 2
    modes, splits = list(_MODES), list(splits)
    if not settings.search:
        modes, splits = modes[:1], splits[:1]

    def per_palm(starts: int) -> int:  # sweeps per PALM run if the starts take half the budget
        return int(total / 2 / (starts * start_updates))

    nb_starts = len(modes) + len(splits) - 1
    smallest = min(2, nb_starts)
    while nb_starts > smallest and per_palm(nb_starts) < settings.min_round_sweeps:
        nb_starts -= 1
    modes = modes[: min(len(modes), nb_starts)]
    splits = splits[: nb_starts - len(modes) + 1]
    return Schedule(tuple(modes), tuple(splits), max(5, per_palm(nb_starts)), total)


def run_search(
    target: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    total_nonzeros: int,
    *,
    nnz_split: Sequence[float] | None = None,
    nonzeros: Sequence[int] | None = None,
    seed: int = 0,
    settings: PALMSettings,
    block: int = 1,
) -> Factorization:
    """The search of :func:`structurednets_psm.fit_psm` (which documents it), on one thread
    count already set."""
    target = target.detach().to(device="cpu", dtype=DTYPE)
    grid = block_shapes(shapes, block)

    def allocate(split: Sequence[float]) -> tuple[int, ...]:
        if nonzeros is not None:
            return tuple(nonzeros)
        blocks = split_nonzeros(total_nonzeros // (block * block), grid, split)
        return tuple(count * block * block for count in blocks)

    if nonzeros is not None or nnz_split is not None:
        splits = [tuple(nnz_split or nonzeros)]
    else:
        splits = candidate_splits(len(shapes))
    work = schedule(shapes, splits, settings)
    search = Search(target, shapes, settings, seed, block)
    first_split = allocate(work.splits[0])
    total_updates, unstructured = work.total_updates, False
    for index, (projection, update_way, continuation) in enumerate(work.modes):
        run = search.start(
            Strategy(first_split, projection, update_way, continuation), work.sweeps_per_palm
        )
        if run.error() <= EXACT:
            break
        if index == 1 and search.best().error() > settings.unstructured_error:
            unstructured = True
            break
    best = search.best()
    if unstructured:
        total_updates = int(settings.unstructured_share * total_updates)
    elif best.error() > EXACT:
        for split in work.splits[1:]:
            search.start(replace(best.strategy, nonzeros=allocate(split)), work.sweeps_per_palm)
        best = search.best()
    remaining = max(0, total_updates - search.spent) // len(shapes)
    best.refine(remaining, settings.cycle_sweeps, settings.reheat)
    polish(best.state, settings.polish_sweeps)
    fill_supports(best.state)
    result = finish(best, search.spent)
    result.tried = search.tried
    return result
