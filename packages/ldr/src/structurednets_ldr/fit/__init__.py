"""Fitting ``A``, ``B``, ``G``, ``H`` of an LDR matrix to a dense target (float64):
:func:`fit_ldr`, in four phases, each a function here.

1. Shift starts (:func:`score_starts`): pairs of shift operators for which Toeplitz-,
   Hankel- and circulant-like matrices have a small displacement rank, plus zero operators
   (then ``W = G H^T``, the truncated SVD: the fit is never worse than low rank of the same
   displacement rank). ``sum_(k<m) A^k (W - A W B) B^k = W - A^m W B^m``, so for nilpotent
   shifts with ``m >= min(out, in)`` (or cyclic ones with ``m = n``) the truncated SVD of the
   displacement ``W - A W B`` gives the generators exactly when its rank is ``<= r``
   (:mod:`structurednets_ldr.fit.starts`).
2. Estimated operators (:func:`estimate_from_starts`): for an LDR matrix, ``W - A W B`` has
   rank ``<= 2 r`` for its own ``A``, ``B``; from the two shift starts nearest to that,
   Levenberg-Marquardt on the displacement's singular values beyond ``2 r`` (directly, else
   after a first run that allows a larger rank) finds three-band ``A``, ``B`` that zero them;
   then ``X`` solves the Stein equation ``X - A^m X B^m = W - A W B`` and its truncated SVD
   gives ``G``, ``H`` (:mod:`structurednets_ldr.fit.estimation`). Stops as soon as a fit is
   within ``tolerance``.
3. Descended operators (:func:`descend_from_starts`), for targets that are not LDR matrices:
   a short L-BFGS descent on the displacement's tail from the best shift starts.
4. Refinement (:func:`refine_best`): the best candidates are refined by L-BFGS on all of
   ``A``, ``B``, ``G``, ``H`` (relative Frobenius error).

A target that is far from every LDR matrix (:func:`not_an_ldr_matrix`: the displacement's
energy beyond rank ``2 r`` at every shift start, as trained weights have it) skips phases 2
to 4 for one short refinement from the truncated SVD with small shift operators
(:func:`fit_ldr` returns in seconds rather than ``max_seconds``).

Everything is deterministic; only ``max_seconds`` can cut a fit short.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from structurednets.plugin import check_positive_int
from structurednets_ldr.cost import rank_within_cost
from structurednets_ldr.fit.estimation import (
    CONTINUATIONS,
    MAX_ESTIMATED_BANDS,
    descend_operators,
    estimate_operators,
    safe_tail,
    stalled,
)
from structurednets_ldr.fit.lbfgs import refine
from structurednets_ldr.fit.starts import initial_generators, shift_starts, solve_generators
from structurednets_ldr.kernels import weight
from structurednets_ldr.operators import cyclic_shift_bands
from structurednets_ldr.schedule import choose_schedule

__all__ = [
    "Candidate",
    "FitProblem",
    "LDRFit",
    "descend_from_starts",
    "estimate_from_starts",
    "fit_ldr",
    "not_an_ldr_matrix",
    "refine_best",
    "score_starts",
]

# Shares of max_seconds by which the estimations and the descents end; the refinement gets
# the rest.
_ESTIMATION_SHARE = 0.5
_DESCENT_SHARE = 0.75
# A target whose displacement for every shift start keeps more than this share of its
# energy beyond rank 2 r is no LDR matrix to identify (trained weights: 0.5 to 1.5; LDR
# matrices from shifts with 10% noise, Toeplitz with noise, smooth kernels: below 0.01).
NOT_LDR_TAIL = 0.1
# Such a target gets one refinement of max_evaluations / 16 evaluations, within this share
# of max_seconds, from the truncated SVD with small cyclic-shift operators. On the MiniLM
# encoder's weights (384 x 384 to 1536 x 384, one evaluation 0.13-0.5 s) the refinement
# gained at most 2% over the truncated SVD (0.6716 -> 0.6590) and took 7.5 s a layer with
# max_evaluations / 4 and 15%: it must not cost more than a few seconds.
_OTHER_EVALUATIONS = 16
_OTHER_SHARE = 0.04
_OTHER_OPERATOR_SCALE = 0.2


@dataclass(frozen=True)
class LDRFit:
    """Result of :func:`fit_ldr` (float64 CPU tensors).

    Attributes:
        A_bands: ``(3, out)`` bands of ``A``.
        B_bands: ``(3, in)`` bands of ``B``.
        G: ``(out, r)``.
        H: ``(in, r)``.
        relative_error: ``||W - target||_F / ||target||_F``.
        start: name of the start the result was refined from.
        nb_evaluations: loss evaluations of the refinement.
        seconds: wall time of the whole fit.
    """

    A_bands: torch.Tensor
    B_bands: torch.Tensor
    G: torch.Tensor
    H: torch.Tensor
    relative_error: float
    start: str
    nb_evaluations: int
    seconds: float


class Candidate(NamedTuple):
    """One candidate of the fit: its relative error, the name of how it was found, and its
    ``(A_bands, B_bands, G, H)``."""

    error: float
    name: str
    parameters: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class FitProblem:
    """The matrix being fitted ``(out, in)`` (float64), with the sizes of the LDR matrix."""

    matrix: torch.Tensor
    displacement_rank: int
    krylov_columns: int
    norm: torch.Tensor
    chain_length: int  # of the explicit W that every error is computed with

    def error(self, A_bands, B_bands, G, H) -> torch.Tensor:
        """``||W - target||_F / ||target||_F``; differentiable."""
        W = weight(A_bands, B_bands, G, H, self.krylov_columns, self.chain_length)
        return torch.linalg.norm(W - self.matrix) / self.norm

    def candidate(self, name: str, A_bands, B_bands, G, H) -> Candidate | None:
        """The candidate of these parameters, or ``None`` if its error is not a number."""
        error = float(self.error(A_bands, B_bands, G, H))
        return Candidate(error, name, (A_bands, B_bands, G, H)) if error == error else None

    def solved(self, name: str, A_bands, B_bands) -> Candidate | None:
        """The candidate of these operators with the Stein equation's generators, or
        ``None`` where the equation has no solution (e.g. ``A = B = I``: a wrong zero)."""
        try:
            G, H = solve_generators(
                self.matrix, A_bands, B_bands, self.displacement_rank, self.krylov_columns
            )
        except (np.linalg.LinAlgError, ValueError):
            return None
        return self.candidate(name, A_bands, B_bands, G, H)


def fit_ldr(
    matrix: torch.Tensor,
    displacement_rank: int,
    krylov_columns: int | None = None,
    *,
    operators: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_evaluations: int = 400,
    max_seconds: float = 50.0,
    tolerance: float = 1e-9,
    nb_refined: int = 2,
    max_cost_ratio: float | None = None,
) -> LDRFit:
    """Fit an LDR matrix of displacement rank ``r`` to ``matrix`` (``(out, in)``).

    Args:
        matrix: the matrix to approximate (tensor or array; fitted in float64).
        displacement_rank: ``r``, the columns of ``G`` and ``H`` (the budget:
            ``(r + 3) (out + in)`` scalars).
        krylov_columns: ``m``; default ``min(out, in)``.
        operators: bands ``(A_bands, B_bands)`` to start from instead of the built-in starts.
        max_evaluations: loss evaluations of the refinement, over all refined starts.
        max_seconds: wall-time limit of the whole fit; hitting it makes the result depend
            on the machine's speed, so it is a safety net, not the normal stop.
        tolerance: stop refining once the relative error is below this.
        nb_refined: how many of the best starts are refined (each gets an equal share of
            ``max_evaluations``).
        max_cost_ratio: a bound on the layer's cost ratio (forward and backward
            multiply-adds at batch 256 against ``nn.Linear``,
            :func:`~structurednets_ldr.cost.cost_ratio`); ValueError if the layout
            ``(displacement_rank, krylov_columns)`` exceeds it, naming the largest rank
            within it (or the smallest achievable ratio).

    Returns:
        An :class:`LDRFit`: the bands, the generators and how the fit went.
    """
    started = time.perf_counter()
    target = torch.as_tensor(matrix).to(torch.float64)
    if target.dim() != 2:
        raise ValueError(f"matrix must be 2-D (out, in), got shape {tuple(target.shape)}")
    rank = check_positive_int("displacement_rank", displacement_rank)
    out_dim, in_dim = target.shape
    if krylov_columns is None:
        krylov_columns = min(out_dim, in_dim)
    krylov_columns = check_positive_int("krylov_columns", krylov_columns)
    if max_cost_ratio is not None:
        within = rank_within_cost(out_dim, in_dim, krylov_columns, rank, max_cost_ratio)
        if within != rank:
            raise ValueError(
                f"displacement_rank={rank} costs more than max_cost_ratio={max_cost_ratio!r}; "
                f"rank {within} is the largest within it"
            )
    norm = torch.linalg.norm(target)
    if norm == 0:
        zeros = shift_starts(out_dim, in_dim)["low-rank"]
        return LDRFit(
            *zeros,
            target.new_zeros(out_dim, rank),
            target.new_zeros(in_dim, rank),
            relative_error=0.0,
            start="zero target",
            nb_evaluations=0,
            seconds=time.perf_counter() - started,
        )
    _, chain_length = choose_schedule(out_dim, in_dim, krylov_columns, rank, None)
    problem = FitProblem(target, rank, krylov_columns, norm, chain_length)
    if operators is not None:
        starts = {"given operators": tuple(t.to(torch.float64) for t in operators)}
    else:
        starts = shift_starts(out_dim, in_dim)
    with torch.no_grad():
        scored = score_starts(problem, starts)
        shifts = [item for item in scored if item.name != "low-rank"]
        if operators is None and not_an_ldr_matrix(problem, shifts):
            return _fit_other(problem, scored, max_evaluations, tolerance, started, max_seconds)
        deadline = started + _ESTIMATION_SHARE * max_seconds
        scored += estimate_from_starts(problem, shifts, scored, tolerance, deadline)
        end = started + _DESCENT_SHARE * max_seconds
        scored += descend_from_starts(problem, shifts, scored, tolerance, end)
    scored.sort(key=lambda item: item.error)
    best, evaluations = refine_best(
        problem, scored, max_evaluations, nb_refined, tolerance, started, max_seconds
    )
    return LDRFit(
        *(t.detach().clone() for t in best.parameters),
        relative_error=best.error,
        start=best.name,
        nb_evaluations=evaluations,
        seconds=time.perf_counter() - started,
    )


def not_an_ldr_matrix(problem: FitProblem, shifts: list[Candidate]) -> bool:
    """Whether the target is far from every LDR matrix the estimation could find: for each
    shift start the displacement ``W - A W B`` keeps more than :data:`NOT_LDR_TAIL` of
    ``||W||^2`` beyond its leading ``2 r`` singular values (the estimation starts from the
    two shift starts with the smallest such tails and converges only from near a zero)."""
    r = problem.displacement_rank
    if 2 * r >= min(problem.matrix.shape):
        return False
    return all(
        safe_tail(problem.matrix, *item.parameters[:2], 2 * r) > NOT_LDR_TAIL for item in shifts
    )


def _fit_other(
    problem: FitProblem,
    scored: list[Candidate],
    max_evaluations: int,
    tolerance: float,
    started: float,
    max_seconds: float,
) -> LDRFit:
    """The fit of a target that is no LDR matrix (:func:`not_an_ldr_matrix`), trained
    weights say: no estimation or descent (whose runs ended no better than the truncated
    SVD there, in 50 s), but one short L-BFGS refinement from the truncated SVD ``G H^T``
    with cyclic shifts scaled by 0.2 as operators (zero operators are a stationary point:
    the refinement could not move them). Trained digit weights 256 x 256, shares 0.05, 0.1,
    0.25: 0.855, 0.740, 0.620 in 100 evaluations (2.5-6.5 s) against the truncated SVD's
    0.904, 0.760, 0.644 (and the four phases' 0.842, 0.760, 0.644 in 28-51 s); the current
    ``max_evaluations / 16`` within 4% of ``max_seconds`` give 0.879 at share 0.05 in 0.8 s."""
    low_rank = next(item for item in scored if item.name == "low-rank")
    out_dim, in_dim = problem.matrix.shape
    scale = _OTHER_OPERATOR_SCALE
    A_bands = scale * cyclic_shift_bands(out_dim, 1.0, dtype=torch.float64)
    B_bands = scale * cyclic_shift_bands(in_dim, -1.0, down=False, dtype=torch.float64)
    with torch.no_grad():
        perturbed = problem.candidate(
            "low-rank, small cyclic operators", A_bands, B_bands, *low_rank.parameters[2:]
        )
    candidates = sorted([*scored, *([perturbed] if perturbed else [])], key=lambda c: c.error)
    best, evaluations = candidates[0], 0
    if perturbed is not None and best.error > tolerance:
        error, refined, evaluations = refine(
            problem.error,
            perturbed.parameters,
            max(1, max_evaluations // _OTHER_EVALUATIONS),
            tolerance,
            started + _OTHER_SHARE * max_seconds,
        )
        if error < best.error:
            best = Candidate(error, perturbed.name, tuple(refined))
    return LDRFit(
        *(t.detach().clone() for t in best.parameters),
        relative_error=best.error,
        start=best.name,
        nb_evaluations=evaluations,
        seconds=time.perf_counter() - started,
    )


def score_starts(problem: FitProblem, starts: dict) -> list[Candidate]:
    """Phase 1: every start's operators with :func:`initial_generators`, by error (a
    non-finite error counts as infinite)."""
    scored = []
    r, m = problem.displacement_rank, problem.krylov_columns
    for name, (A_bands, B_bands) in starts.items():
        G, H = initial_generators(problem.matrix, A_bands, B_bands, r, m)
        error = float(problem.error(A_bands, B_bands, G, H))
        scored.append(
            Candidate(error if error == error else float("inf"), name, (A_bands, B_bands, G, H))
        )
    scored.sort(key=lambda item: item.error)
    return scored


def _continuations(out_dim: int, in_dim: int, displacement_rank: int) -> list[tuple[int, ...]]:
    """The rank sequences of the estimation (see ``CONTINUATIONS``), each ending at ``2 r``;
    none where the Gauss-Newton matrix would be too large."""
    if 3 * (out_dim + in_dim) > MAX_ESTIMATED_BANDS:
        return []
    smallest = min(out_dim, in_dim)
    continuations = []
    for multiples in CONTINUATIONS:
        ranks = tuple(dict.fromkeys(min(k * displacement_rank, smallest - 1) for k in multiples))
        if ranks[-1] == 2 * displacement_rank and ranks not in continuations:
            continuations.append(ranks)
    return continuations


def _estimate(
    problem: FitProblem, start: Candidate, ranks: tuple[int, ...], deadline: float
) -> tuple[Candidate | None, bool]:
    """Operators estimated from ``start`` through the tails beyond ``ranks`` in turn, with
    their Stein generators: ``(candidate or None, whether the last run stalled)``."""
    A_bands, B_bands, _, _ = start.parameters
    try:
        for rank in ranks:
            A_bands, B_bands, singular_values = estimate_operators(
                problem.matrix, A_bands, B_bands, rank, deadline=deadline
            )
    except torch.linalg.LinAlgError:
        return None, True
    via = "" if len(ranks) == 1 else f" via rank {ranks[0]}"
    candidate = problem.solved(f"{start.name}, estimated{via}", A_bands, B_bands)
    r = problem.displacement_rank
    return candidate, stalled(singular_values, 2 * r, r)


def estimate_from_starts(
    problem: FitProblem,
    shifts: list[Candidate],
    scored: list[Candidate],
    tolerance: float,
    deadline: float,
) -> list[Candidate]:
    """Phase 2: operators estimated from the target itself, from the two shift starts closest
    to a zero of the tail beyond ``2 r``, directly and by continuations that first allow a
    larger rank, while the runs stall and until one candidate (of ``scored`` or these) fits
    to ``tolerance``. Returns the new candidates."""
    out_dim, in_dim = problem.matrix.shape
    r = problem.displacement_rank
    continuations = _continuations(out_dim, in_dim, r)

    # The starts closest to a zero of the tail (not those with the smallest error: for
    # perturbed cyclic shifts in a rectangular W the nilpotent shifts fit better, but the
    # estimation only converges from the cyclic ones).
    def tail(item: Candidate) -> float:
        A_bands, B_bands, _, _ = item.parameters
        return safe_tail(problem.matrix, A_bands, B_bands, 2 * r)

    operator_starts = sorted(shifts if continuations else [], key=tail)[:2]
    found: list[Candidate] = []
    # Continuations and the second start only while the runs stall.
    still_stalled = True
    for start in operator_starts:
        for ranks in continuations:
            if (
                not still_stalled
                or min(item.error for item in (*scored, *found)) <= tolerance
                or time.perf_counter() > deadline
            ):
                break
            candidate, still_stalled = _estimate(problem, start, ranks, deadline)
            if candidate is not None:
                found.append(candidate)
    return found


def descend_from_starts(
    problem: FitProblem,
    shifts: list[Candidate],
    scored: list[Candidate],
    tolerance: float,
    end: float,
) -> list[Candidate]:
    """Phase 3, for targets that are not LDR matrices (trained weights, say):
    Levenberg-Marquardt, run to a zero of the tail, ends at operators with huge powers there.
    A short descent on the tail beyond ``r`` and ``2 r`` from the two shift starts with the
    smallest errors stays near them and gives better starts for the refinement (trained
    256 x 256 digit weights, ``r = 3``: 0.843 against 0.904 without it). Each descent gets an
    equal share of the time left until ``end``; none once a candidate fits to ``tolerance``.
    Returns the new candidates."""
    r = problem.displacement_rank
    smallest = min(problem.matrix.shape)
    descents = [
        (item, rank)
        for item in shifts[:2]  # sorted by error
        for rank in sorted({r, 2 * r})
        if rank < smallest
    ]
    found: list[Candidate] = []
    for index, (start, rank) in enumerate(descents):
        if min(item.error for item in (*scored, *found)) <= tolerance:
            break
        A_bands, B_bands, _, _ = start.parameters
        now = time.perf_counter()
        A_bands, B_bands = descend_operators(
            problem.matrix,
            A_bands,
            B_bands,
            rank,
            deadline=now + (end - now) / (len(descents) - index),
        )
        candidate = problem.solved(f"{start.name}, descended to rank {rank}", A_bands, B_bands)
        if candidate is not None:
            found.append(candidate)
    return found


def refine_best(
    problem: FitProblem,
    scored: list[Candidate],
    max_evaluations: int,
    nb_refined: int,
    tolerance: float,
    started: float,
    max_seconds: float,
) -> tuple[Candidate, int]:
    """Phase 4: L-BFGS on all parameters from the ``nb_refined`` best of ``scored`` (sorted
    by error), each with an equal share of ``max_evaluations``, until the fit is within
    ``tolerance`` or ``max_seconds`` after ``started``. Returns the best candidate (named by
    its start) and the evaluations used."""
    best = scored[0]
    budget = max(1, max_evaluations // max(1, nb_refined))
    evaluations = 0
    for _, name, start in scored[:nb_refined]:
        if best.error <= tolerance or time.perf_counter() - started > max_seconds:
            break
        refined_error, refined, used = refine(
            problem.error, start, budget, tolerance, started + max_seconds
        )
        evaluations += used
        if refined_error < best.error:
            best = Candidate(refined_error, name, tuple(refined))
    return best, evaluations
