"""Fitting ``A``, ``B``, ``G``, ``H`` of an LDR matrix to a dense target (float64).

1. Shift starts: pairs of shift operators for which Toeplitz-, Hankel- and circulant-like
   matrices have a small displacement rank, plus zero operators (then ``W = G H^T``, the
   truncated SVD: the fit is never worse than low rank of the same displacement rank).
   ``sum_(k<m) A^k (W - A W B) B^k = W - A^m W B^m``, so for nilpotent shifts with
   ``m >= min(out, in)`` (or cyclic ones with ``m = n``) the truncated SVD of the
   displacement ``W - A W B`` gives the generators exactly when its rank is ``<= r``.
2. Estimated operators: for an LDR matrix, ``W - A W B`` has rank ``<= 2 r`` for its own
   ``A``, ``B``; from the best shift starts, L-BFGS looks for three-band ``A``, ``B`` that
   make the displacement nearly of rank ``r`` (and ``2 r``); then ``X`` solves the Stein
   equation ``X - A^m X B^m = W - A W B`` and its truncated SVD gives ``G``, ``H``.
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


def estimate_operators(
    target: torch.Tensor,
    A_bands: torch.Tensor,
    B_bands: torch.Tensor,
    rank: int,
    *,
    max_evaluations: int = 150,
    deadline: float = float("inf"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Operators ``(A, B)`` (bands) for which ``target - A target B`` is nearly of rank ``rank``.

    For an LDR matrix ``W - A W B = X - A^m X B^m`` has rank ``<= 2 r`` for its own
    operators (``<= r`` when ``A^m W B^m`` is negligible or a multiple of ``W``). L-BFGS on
    ``min_L ||W - A W B - L||_F^2`` over rank-``rank`` ``L`` (whose gradient in ``A``, ``B``
    is that at the truncated SVD ``L``), from the given operators.
    """
    norm_squared = torch.linalg.norm(target) ** 2
    A_bands = A_bands.detach().clone().requires_grad_(True)
    B_bands = B_bands.detach().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [A_bands, B_bands],
        lr=1.0,
        max_iter=max_evaluations,
        max_eval=max_evaluations,
        history_size=50,
        tolerance_grad=1e-16,
        tolerance_change=1e-20,
        line_search_fn="strong_wolfe",
    )
    best = [float("inf"), A_bands.detach().clone(), B_bands.detach().clone()]

    def closure() -> torch.Tensor:
        if time.perf_counter() > deadline:
            raise _Stop
        optimiser.zero_grad()
        displacement = target - bands_to_dense(A_bands) @ target @ bands_to_dense(B_bands)
        with torch.no_grad():
            U, S, Vh = torch.linalg.svd(displacement, full_matrices=False)
            low_rank = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        loss = (displacement - low_rank).square().sum() / norm_squared
        value = float(loss.detach())
        if not value < float("inf"):
            raise _Stop
        if value < best[0]:
            best[:] = [value, A_bands.detach().clone(), B_bands.detach().clone()]
        loss.backward()
        return loss

    try:
        with torch.enable_grad():
            optimiser.step(closure)
    except (_Stop, torch.linalg.LinAlgError):
        pass
    return best[1], best[2]


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
    C = U.conj().T @ displacement.numpy() @ V
    X = np.zeros_like(C)
    for j in range(C.shape[1]):
        rhs = C[:, j] + T @ (X[:, :j] @ S[:j, j])
        system = np.eye(C.shape[0]) - S[j, j] * T
        X[:, j] = scipy.linalg.solve_triangular(system, rhs)
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
        # Operators estimated from the target itself, from the best operator starts.
        ranks = sorted({displacement_rank, 2 * displacement_rank})
        ranks = [rank for rank in ranks if rank < min(out_dim, in_dim)]
        operator_starts = [item for item in scored if item[1] != "low-rank"][:2]
        runs = [(item, rank) for item in operator_starts for rank in ranks]
        for index, ((_, name, (A_bands, B_bands, _, _)), rank) in enumerate(runs):
            if min(item[0] for item in scored) <= tolerance:
                break
            deadline = started + max_seconds * 0.5 * (index + 1) / len(runs)
            A_bands, B_bands = estimate_operators(target, A_bands, B_bands, rank, deadline=deadline)
            try:
                G, H = solve_generators(target, A_bands, B_bands, displacement_rank, krylov_columns)
            except (np.linalg.LinAlgError, ValueError):
                continue
            error = float(relative_error(A_bands, B_bands, G, H))
            if error == error:
                scored.append((error, f"{name}, estimated", (A_bands, B_bands, G, H)))
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
    parameters = [t.detach().clone().requires_grad_(True) for t in start]
    optimiser = torch.optim.LBFGS(
        parameters,
        lr=1.0,
        max_iter=budget,
        max_eval=budget,
        history_size=30,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )
    best = [float("inf"), [t.detach().clone() for t in parameters]]
    evaluations = [0]

    def closure() -> torch.Tensor:
        if time.perf_counter() > deadline:
            raise _Stop
        optimiser.zero_grad()
        error = relative_error(*parameters)
        value = float(error.detach())
        evaluations[0] += 1
        if value < best[0]:
            best[0] = value
            best[1] = [t.detach().clone() for t in parameters]
        if value <= tolerance or value != value or value == float("inf"):
            raise _Stop
        loss = error * error
        loss.backward()
        return loss

    try:
        optimiser.step(closure)
    except (_Stop, torch.linalg.LinAlgError):
        pass
    return best[0], best[1], evaluations[0]
