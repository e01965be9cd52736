"""Operators estimated from the target: zeros of the displacement's tail.

For an LDR matrix ``W`` with operators ``A``, ``B`` the displacement ``D = W - A W B`` equals
``X - A^m X B^m``, of rank ``<= 2 r``; the operators are zeros of ``D``'s energy beyond its
leading ``2 r`` singular values (:func:`displacement_tail`). :func:`estimate_operators` runs
Levenberg-Marquardt to such a zero, :func:`stalled` tells a run that stopped near a wrong one
(the fit then tries the next of :data:`CONTINUATIONS`), and :func:`descend_operators` takes a
few L-BFGS steps for targets that are not LDR matrices, where Levenberg-Marquardt drifts.
"""

from __future__ import annotations

import time

import torch

from structurednets_ldr.fit.lbfgs import minimise
from structurednets_ldr.operators import bands_to_dense

__all__ = [
    "CONTINUATIONS",
    "MAX_ESTIMATED_BANDS",
    "descend_operators",
    "displacement_tail",
    "estimate_operators",
    "safe_tail",
    "stalled",
]


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


def safe_tail(target, A_bands, B_bands, rank) -> float:
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
                if safe_tail(target, *trial, rank) < tail:
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

    _, (A_bands, B_bands), _ = minimise(
        objective,
        (A_bands, B_bands),
        budget=max_evaluations,
        history_size=50,
        tolerance_grad=1e-16,
        tolerance_change=1e-20,
        deadline=deadline,
    )
    return A_bands, B_bands


# Ranks (multiples of r) of the operator estimations, tried in turn while they stall. The
# tail beyond 2 r also has non-isolated zeros where a few band entries are wrong and their
# rank-one errors fill the leading subspace; a run from the shifts can stall near one.
# Starting with a larger rank lets such directions go first, then 2 r takes them back.
# For perturbed shifts at 256 x 256 (seeds 0-7), 3 r then 2 r identified all with 1% and
# 5% noise and 7 of 8 with 10%, 2 r alone 7 of 8 with 5% and 6 of 8 with 10% (stalling for 40
# steps otherwise), the sequences together all; at 512 x 512 2 r alone stalled with 5%.
CONTINUATIONS = ((3, 2), (2,), (5, 2), (4, 2))
# The Gauss-Newton matrix has (3 (out + in))^2 entries: 0.3 GB and about 4.5 s a step at
# 1024 x 1024 (0.7 s at 512 x 512, 0.1 s at 256 x 256); beyond, no estimation.
MAX_ESTIMATED_BANDS = 6144


def stalled(singular_values: torch.Tensor, rank: int, displacement_rank: int) -> bool:
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
