"""Fitting ``A``, ``B``, ``G``, ``H`` of an LDR matrix to a dense target (float64).

1. Shift starts: pairs of shift operators for which Toeplitz-, Hankel- and circulant-like
   matrices have a small displacement rank, plus zero operators (then ``W = G H^T``, the
   truncated SVD: the fit is never worse than low rank of the same displacement rank).
   ``sum_(k<m) A^k (W - A W B) B^k = W - A^m W B^m``, so for nilpotent shifts with
   ``m >= min(out, in)`` (or cyclic ones with ``m = n``) the truncated SVD of the
   displacement ``W - A W B`` gives the generators exactly when its rank is ``<= r``.
2. Estimated operators: for an LDR matrix, ``W - A W B`` has rank ``<= 2 r`` for its own
   ``A``, ``B``; from the two shift starts nearest to that, Levenberg-Marquardt on the
   displacement's singular values beyond ``2 r`` (directly, else after a first run that
   allows a larger rank) finds three-band ``A``, ``B`` that zero them; then ``X`` solves
   the Stein equation ``X - A^m X B^m = W - A W B`` and its truncated SVD gives ``G``, ``H``.
   Stops as soon as a fit is within ``tolerance``.
3. The best starts are refined by L-BFGS on all of ``A``, ``B``, ``G``, ``H`` (relative
   Frobenius error).

Everything is deterministic; only ``max_seconds`` can cut a fit short.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from structurednets_ldr.operators import bands_to_dense, cyclic_shift_bands
from structurednets_ldr.ops import ldr_weight
from structurednets_ldr.products import choose_plan, make_plan

__all__ = ["LDRFit", "fit_ldr", "initial_generators"]


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


def _shift_starts(out_dim: int, in_dim: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Operator pairs ``(A, B)`` to start from, as bands."""

    def shift(n: int, down: bool, corner: float = 0.0) -> torch.Tensor:
        return cyclic_shift_bands(n, corner, down=down, dtype=torch.float64)

    return {
        # The layer's random start: A = Z_1, B = Z_(-1)^T, orthogonal.
        "cyclic": (shift(out_dim, True, 1.0), shift(in_dim, False, -1.0)),
        # W - Z W Z^T vanishes but on the first row and column for Toeplitz W.
        "toeplitz": (shift(out_dim, True), shift(in_dim, False)),
        "toeplitz-reversed": (shift(out_dim, False), shift(in_dim, True)),
        # W - Z W Z vanishes but on the first row and last column for Hankel W.
        "hankel": (shift(out_dim, True), shift(in_dim, True)),
        "hankel-reversed": (shift(out_dim, False), shift(in_dim, False)),
        "low-rank": (
            torch.zeros(3, out_dim, dtype=torch.float64),
            torch.zeros(3, in_dim, dtype=torch.float64),
        ),
    }


def initial_generators(
    target: torch.Tensor, A_bands: torch.Tensor, B_bands: torch.Tensor, rank: int, nb_columns: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, H)`` from the truncated SVD of the displacement ``target - A target B``.

    ``sum_(k<m) A^k (W - A W B) B^k = W - A^m W B^m``, so this is exact when that
    displacement has rank ``<= rank`` and ``A^m W B^m`` vanishes (nilpotent ``A`` or ``B``)
    or is a multiple ``c W`` (then the displacement is divided by ``1 - c``; e.g. ``c = -1``
    for ``A = Z_1``, ``B = Z_(-1)^T`` and ``m = n``). The singular values are split evenly
    between ``G`` and ``H``; missing ranks are zero.
    """
    A, B = bands_to_dense(A_bands), bands_to_dense(B_bands)
    displacement = target - A @ target @ B
    ends = (
        torch.linalg.matrix_power(A, nb_columns) @ target @ torch.linalg.matrix_power(B, nb_columns)
    )
    scale = torch.linalg.lstsq(target.reshape(-1, 1), ends.reshape(-1, 1)).solution.item()
    if torch.linalg.norm(ends - scale * target) <= 1e-9 * torch.linalg.norm(target) and scale != 1:
        displacement = displacement / (1.0 - scale)
    return _truncated_factors(displacement, rank)


def _band_positions(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each entry of ``bands.reshape(-1)`` (bands ``(3, n)``)."""
    rows = torch.arange(n).repeat(3)
    columns = (rows + torch.arange(-1, 2).repeat_interleave(n)) % n
    return rows, columns


def displacement_tail(
    target: torch.Tensor, A_bands: torch.Tensor, B_bands: torch.Tensor, rank: int
) -> float:
    """``sum_(i > rank) sigma_i(target - A target B)^2 / ||target||^2``."""
    displacement = target - bands_to_dense(A_bands) @ target @ bands_to_dense(B_bands)
    tail = torch.linalg.svdvals(displacement)[rank:]
    return float(tail.square().sum() / target.square().sum())


def _safe_tail(target, A_bands, B_bands, rank) -> float:
    try:
        tail = displacement_tail(target, A_bands, B_bands, rank)
    except torch.linalg.LinAlgError:
        return float("inf")
    return tail if tail == tail else float("inf")


def estimate_operators(
    target: torch.Tensor,
    A_bands: torch.Tensor,
    B_bands: torch.Tensor,
    rank: int,
    *,
    max_iterations: int = 40,
    deadline: float = float("inf"),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Operators ``(A, B)`` (bands) for which ``target - A target B`` is nearly of rank ``rank``.

    For an LDR matrix ``D = W - A W B = X - A^m X B^m`` has rank ``<= 2 r`` for its own
    operators, so they are zeros of the tail ``f = sum_(i > rank) sigma_i(D)^2`` with
    ``rank = 2 r``. Levenberg-Marquardt on ``f``, from the given operators: with ``P``, ``Q``
    the projectors onto the complements of ``D``'s leading ``rank`` left and right singular
    vectors, the residual is ``P D Q`` and its linearisation ``-P (dA W B + A W dB) Q``
    (exact at a zero of ``f``; the one-sided ``P dD`` would also count moves that only
    rotate the leading subspace). ``D`` is linear in the bands of ``A`` and of ``B``, so the
    Gauss-Newton matrix over all ``3 (out + in)`` bands is assembled from a few
    ``n x n`` products. Each step is rescaled to ``||A_bands|| = ||B_bands||`` (``D`` is
    invariant under ``(c A, B / c)``). Near a zero ``f`` falls quadratically: 1%- and
    5%-perturbed shifts at 256 x 256 are identified to rounding error in 4 to 10 steps.

    Returns the bands and the singular values of their ``D``, divided by ``||W||``
    (``f / ||W||^2`` is the sum of squares of those beyond ``rank``).
    """
    out_dim, in_dim = target.shape
    norm_squared = target.square().sum()
    rows_A, columns_A = _band_positions(out_dim)
    rows_B, columns_B = _band_positions(in_dim)
    nb_A = rows_A.numel()

    def balanced(A_bands, B_bands):
        norm_A, norm_B = torch.linalg.norm(A_bands), torch.linalg.norm(B_bands)
        if norm_A > 0 and norm_B > 0:
            scale = (norm_B / norm_A).sqrt()
            return A_bands * scale, B_bands / scale
        return A_bands, B_bands

    def state(A_bands, B_bands):
        A, B = bands_to_dense(A_bands), bands_to_dense(B_bands)
        displacement = target - A @ target @ B
        U, S, Vh = torch.linalg.svd(displacement)
        tail = float(S[rank:].square().sum() / norm_squared)
        return A, B, displacement, U, S, Vh, tail

    A_bands, B_bands = balanced(A_bands.to(torch.float64), B_bands.to(torch.float64))
    A, B, displacement, U, S, Vh, tail = state(A_bands, B_bands)
    damping = 1e-3
    for _ in range(max_iterations):
        if tail <= 1e-26 or time.perf_counter() > deadline:  # 1e-26: rounding errors
            break
        left = torch.eye(out_dim, dtype=target.dtype) - U[:, :rank] @ U[:, :rank].T
        right = torch.eye(in_dim, dtype=target.dtype) - Vh[:rank].T @ Vh[:rank]
        C, E = target @ B, A @ target
        residual = left @ displacement @ right
        C_right, left_E = C @ right, left @ E
        gram_AA = left[rows_A][:, rows_A] * (C_right @ C.T)[columns_A][:, columns_A]
        gram_BB = (E.T @ left_E)[rows_B][:, rows_B] * right[columns_B][:, columns_B]
        gram_AB = left_E[rows_A][:, rows_B] * C_right[columns_A][:, columns_B]
        gram = torch.cat((torch.cat((gram_AA, gram_AB), 1), torch.cat((gram_AB.T, gram_BB), 1)), 0)
        gradient = -torch.cat(
            ((residual @ C.T)[rows_A, columns_A], (E.T @ residual)[rows_B, columns_B])
        )
        scale = gram.diagonal().mean()
        while damping <= 1e10 and time.perf_counter() <= deadline:
            system = gram.clone()
            system.diagonal().add_(damping * scale)
            factor, info = torch.linalg.cholesky_ex(system)
            del system
            if info == 0:
                step = torch.cholesky_solve(-gradient[:, None], factor)[:, 0]
                trial = balanced(
                    A_bands + step[:nb_A].reshape(3, out_dim),
                    B_bands + step[nb_A:].reshape(3, in_dim),
                )
                if _safe_tail(target, *trial, rank) < tail:
                    A_bands, B_bands = trial
                    A, B, displacement, U, S, Vh, tail = state(A_bands, B_bands)
                    damping = max(damping / 10, 1e-12)
                    break
            damping *= 10
        else:
            break
    return A_bands, B_bands, S / norm_squared.sqrt()


def descend_operators(
    target: torch.Tensor,
    A_bands: torch.Tensor,
    B_bands: torch.Tensor,
    rank: int,
    *,
    max_evaluations: int = 150,
    deadline: float = float("inf"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Operators near the given ones for which ``target - A target B`` is closer to rank
    ``rank``: at most ``max_evaluations`` of L-BFGS on ``min_L ||W - A W B - L||_F^2`` over
    rank-``rank`` ``L`` (whose gradient in the bands is that at the truncated SVD ``L``).

    For targets that are not LDR matrices, where :func:`estimate_operators` drifts away.
    """
    norm_squared = target.square().sum()

    def objective(A_bands, B_bands):
        displacement = target - bands_to_dense(A_bands) @ target @ bands_to_dense(B_bands)
        with torch.no_grad():
            U, S, Vh = torch.linalg.svd(displacement, full_matrices=False)
            low_rank = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        loss = (displacement - low_rank).square().sum() / norm_squared
        return loss, loss

    _, (A_bands, B_bands), _ = _minimise(
        objective,
        (A_bands, B_bands),
        budget=max_evaluations,
        history_size=50,
        tolerance_grad=1e-16,
        tolerance_change=1e-20,
        deadline=deadline,
    )
    return A_bands, B_bands


class _Stop(Exception):
    """Ends an L-BFGS run from inside its closure (time limit, tolerance, non-finite loss)."""


def solve_generators(
    target: torch.Tensor, A_bands: torch.Tensor, B_bands: torch.Tensor, rank: int, nb_columns: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, H)``: rank-``rank`` truncation of the ``X`` with ``sum_(k<m) A^k X B^k = target``.

    ``X`` solves the Stein equation ``X - A^m X B^m = target - A target B``, by complex Schur
    forms of ``A^m`` and ``B^m`` and one triangular solve per column.
    """
    A, B = bands_to_dense(A_bands), bands_to_dense(B_bands)
    displacement = target - A @ target @ B
    P = torch.linalg.matrix_power(A, nb_columns).numpy()
    Q = torch.linalg.matrix_power(B, nb_columns).numpy()
    T, U = scipy.linalg.schur(P, output="complex")
    S, V = scipy.linalg.schur(Q, output="complex")
    # Operators with a spectral radius far above 1 (a failed estimation) overflow: the
    # non-finite solution is replaced below.
    with np.errstate(over="ignore", invalid="ignore"):
        C = U.conj().T @ displacement.numpy() @ V
        X = np.zeros_like(C)
        for j in range(C.shape[1]):
            rhs = C[:, j] + T @ (X[:, :j] @ S[:j, j])
            system = np.eye(C.shape[0]) - S[j, j] * T
            X[:, j] = scipy.linalg.solve_triangular(system, rhs, check_finite=False)
        solution = torch.from_numpy((U @ X @ V.conj().T).real)
    if not torch.isfinite(solution).all():
        solution = displacement
    return _truncated_factors(solution, rank)


def _truncated_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = min(rank, S.numel())
    root = S[:keep].sqrt()
    G = matrix.new_zeros(matrix.shape[0], rank)
    H = matrix.new_zeros(matrix.shape[1], rank)
    G[:, :keep] = U[:, :keep] * root
    H[:, :keep] = Vh[:keep].T * root
    return G, H


# Ranks (multiples of r) of the operator estimations, tried in turn while they stall. The
# tail beyond 2 r also has non-isolated zeros where a few band entries are wrong and their
# rank-one errors fill the leading subspace; a run from the shifts can stall near one.
# Starting with a larger rank lets such directions go first, then 2 r takes them back.
# For perturbed shifts at 256 x 256 (seeds 0-7), 3 r then 2 r identified all with 1% and
# 5% noise and 7 of 8 with 10%, 2 r alone 7 of 8 with 5% and 6 of 8 with 10% (stalling for 40
# steps otherwise), the sequences together all; at 512 x 512 2 r alone stalled with 5%.
_CONTINUATIONS = ((3, 2), (2,), (5, 2), (4, 2))
# Shares of max_seconds by which the estimations and the descents end; the refinement gets
# the rest.
_ESTIMATION_SHARE = 0.5
_DESCENT_SHARE = 0.75
# The Gauss-Newton matrix has (3 (out + in))^2 entries: 0.3 GB and about 4.5 s a step at
# 1024 x 1024 (0.7 s at 512 x 512, 0.1 s at 256 x 256); beyond, no estimation.
_MAX_ESTIMATED_BANDS = 6144


def _stalled(singular_values: torch.Tensor, rank: int, displacement_rank: int) -> bool:
    """Whether a run on the tail beyond ``rank`` (``2 r``) that ended with these singular
    values (of ``D / ||W||``) stopped near one of the wrong zeros the continuations are for.

    There a few wrong entries' directions hold places among the leading ``rank`` and push as
    many of the true displacement's out: no gap at ``rank`` (``sigma_(rank+1) > 0.1
    sigma_rank``; 0.6 to 0.98 where 5%- and 10%-perturbed shifts stalled), and the tail sits
    in its first ``r`` singular values (more than half of it; 0.92 to 1 there). Not when
    the tail is at rounding level (a zero, right or not: the Stein solution decides), nor
    at a noise floor (spread over all tail singular values: 0.08 to 0.14 for noise of
    1e-3 and 1e-4 on Toeplitz and LDR matrices) or below a gap (a numerically low-rank
    target).
    """
    squares = singular_values.square()
    tail = squares[rank:].sum()
    return bool(
        tail > 1e-20
        and singular_values[rank] > 0.1 * singular_values[rank - 1]
        and squares[rank : rank + displacement_rank].sum() > 0.5 * tail
    )


def fit_ldr(
    target: torch.Tensor,
    displacement_rank: int,
    krylov_columns: int,
    *,
    operators: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_evaluations: int = 400,
    max_seconds: float = 50.0,
    tolerance: float = 1e-9,
    nb_refined: int = 2,
) -> LDRFit:
    """Fit an LDR matrix of displacement rank ``r`` to ``target`` (``(out, in)``, float64).

    Args:
        target: the matrix to approximate.
        displacement_rank: ``r``, the columns of ``G`` and ``H``.
        krylov_columns: ``m``.
        operators: bands ``(A_bands, B_bands)`` to start from instead of the built-in starts.
        max_evaluations: loss evaluations of the refinement, over all refined starts.
        max_seconds: wall-time limit of the whole fit; hitting it makes the result depend
            on the machine's speed, so it is a safety net, not the normal stop.
        tolerance: stop refining once the relative error is below this.
        nb_refined: how many of the best starts are refined (each gets an equal share of
            ``max_evaluations``).
    """
    started = time.perf_counter()
    target = target.to(torch.float64)
    out_dim, in_dim = target.shape
    norm = torch.linalg.norm(target)
    if norm == 0:
        zeros = _shift_starts(out_dim, in_dim)["low-rank"]
        return LDRFit(
            *zeros,
            target.new_zeros(out_dim, displacement_rank),
            target.new_zeros(in_dim, displacement_rank),
            relative_error=0.0,
            start="zero target",
            nb_evaluations=0,
            seconds=time.perf_counter() - started,
        )
    _, chain_length = choose_plan(out_dim, in_dim, krylov_columns, displacement_rank, None)
    plan = make_plan(out_dim, in_dim, krylov_columns, True, chain_length)

    def relative_error(A_bands, B_bands, G, H) -> torch.Tensor:
        return torch.linalg.norm(ldr_weight(A_bands, B_bands, G, H, plan) - target) / norm

    if operators is not None:
        starts = {"given operators": tuple(t.to(torch.float64) for t in operators)}
    else:
        starts = _shift_starts(out_dim, in_dim)
    scored = []
    with torch.no_grad():
        for name, (A_bands, B_bands) in starts.items():
            G, H = initial_generators(target, A_bands, B_bands, displacement_rank, krylov_columns)
            error = float(relative_error(A_bands, B_bands, G, H))
            scored.append(
                (error if error == error else float("inf"), name, (A_bands, B_bands, G, H))
            )
        scored.sort(key=lambda item: item[0])
        # Operators estimated from the target itself, from the best operator starts: zeros
        # of the displacement's tail beyond 2 r, directly and by continuations that first
        # allow a larger rank (see _CONTINUATIONS), until one fits to the tolerance.
        smallest = min(out_dim, in_dim)
        continuations = []
        for multiples in _CONTINUATIONS if 3 * (out_dim + in_dim) <= _MAX_ESTIMATED_BANDS else ():
            ranks = tuple(
                dict.fromkeys(min(k * displacement_rank, smallest - 1) for k in multiples)
            )
            if ranks[-1] == 2 * displacement_rank and ranks not in continuations:
                continuations.append(ranks)

        # The starts closest to a zero of the tail (not those with the smallest error: for
        # perturbed cyclic shifts in a rectangular W the nilpotent shifts fit better, but the
        # estimation only converges from the cyclic ones).
        def tail(item) -> float:
            A_bands, B_bands, _, _ = item[2]
            return _safe_tail(target, A_bands, B_bands, 2 * displacement_rank)

        shift_starts = [item for item in scored if item[1] != "low-rank"]
        candidates = shift_starts if continuations else []
        operator_starts = sorted(candidates, key=tail)[:2]
        deadline = started + _ESTIMATION_SHARE * max_seconds

        def estimate(start, ranks) -> bool:
            """Adds the estimate to ``scored``; whether the last run stalled."""
            _, name, (A_bands, B_bands, _, _) = start
            try:
                for rank in ranks:
                    A_bands, B_bands, singular_values = estimate_operators(
                        target, A_bands, B_bands, rank, deadline=deadline
                    )
            except torch.linalg.LinAlgError:
                return True
            try:
                G, H = solve_generators(target, A_bands, B_bands, displacement_rank, krylov_columns)
            except (np.linalg.LinAlgError, ValueError):  # e.g. A = B = I: a wrong zero
                pass
            else:
                error = float(relative_error(A_bands, B_bands, G, H))
                if error == error:
                    via = "" if len(ranks) == 1 else f" via rank {ranks[0]}"
                    scored.append((error, f"{name}, estimated{via}", (A_bands, B_bands, G, H)))
            return _stalled(singular_values, 2 * displacement_rank, displacement_rank)

        # Continuations and the second start only while the runs stall.
        stalled = True
        for start in operator_starts:
            for ranks in continuations:
                if (
                    not stalled
                    or min(item[0] for item in scored) <= tolerance
                    or time.perf_counter() > deadline
                ):
                    break
                stalled = estimate(start, ranks)
        # Not an LDR matrix (trained weights, say): Levenberg-Marquardt, run to a zero of the
        # tail, ends at operators with huge powers there. A short descent on the tail beyond
        # r and 2 r from the starts with the smallest errors stays near them and gives better
        # starts for the refinement (trained 256 x 256 digit weights, r = 3: 0.843 against
        # 0.904 without it).
        descents = [
            (item, rank)
            for item in shift_starts[:2]  # scored is sorted by error
            for rank in sorted({displacement_rank, 2 * displacement_rank})
            if rank < smallest
        ]
        end = started + _DESCENT_SHARE * max_seconds
        for index, ((_, name, (A_bands, B_bands, _, _)), rank) in enumerate(descents):
            if min(item[0] for item in scored) <= tolerance:
                break
            now = time.perf_counter()
            A_bands, B_bands = descend_operators(
                target, A_bands, B_bands, rank, deadline=now + (end - now) / (len(descents) - index)
            )
            try:
                G, H = solve_generators(target, A_bands, B_bands, displacement_rank, krylov_columns)
            except (np.linalg.LinAlgError, ValueError):
                continue
            error = float(relative_error(A_bands, B_bands, G, H))
            if error == error:
                scored.append(
                    (error, f"{name}, descended to rank {rank}", (A_bands, B_bands, G, H))
                )
    scored.sort(key=lambda item: item[0])
    best_error, best_name, best = scored[0]
    budget = max(1, max_evaluations // max(1, nb_refined))
    evaluations = 0
    for _, name, start in scored[:nb_refined]:
        if best_error <= tolerance or time.perf_counter() - started > max_seconds:
            break
        refined_error, refined, used = _refine(
            relative_error, start, budget, tolerance, started + max_seconds
        )
        evaluations += used
        if refined_error < best_error:
            best_error, best_name, best = refined_error, name, refined
    return LDRFit(
        *(t.detach().clone() for t in best),
        relative_error=best_error,
        start=best_name,
        nb_evaluations=evaluations,
        seconds=time.perf_counter() - started,
    )


def _refine(relative_error, start, budget: int, tolerance: float, deadline: float):
    """L-BFGS on the squared relative error; returns ``(error, parameters, evaluations)``."""

    def objective(*parameters):
        error = relative_error(*parameters)
        return error, error * error

    return _minimise(
        objective,
        start,
        budget=budget,
        history_size=30,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        deadline=deadline,
        stop_at=tolerance,
    )


def _minimise(
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
