"""Starts of the LDR fit, and generators for given operators.

Shift operators (Toeplitz-, Hankel- and circulant-like matrices have a small displacement rank
for them) and zero operators (then ``W = G H^T``: the truncated SVD) are the fit's starts;
:func:`initial_generators` gives their ``G``, ``H`` from the displacement ``W - A W B``, and
:func:`solve_generators` those of any operators from the Stein equation.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from structurednets.plugin import balanced_truncated_svd
from structurednets_ldr.operators import bands_to_dense, cyclic_shift_bands, transpose_bands

__all__ = [
    "initial_generators",
    "power_times",
    "shift_starts",
    "solve_generators",
    "truncated_factors",
]


def shift_starts(out_dim: int, in_dim: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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
    ends = power_times(
        A_bands, power_times(transpose_bands(B_bands), target.T, nb_columns).T, nb_columns
    )
    scale = torch.linalg.lstsq(target.reshape(-1, 1), ends.reshape(-1, 1)).solution.item()
    if torch.linalg.norm(ends - scale * target) <= 1e-9 * torch.linalg.norm(target) and scale != 1:
        displacement = displacement / (1.0 - scale)
    return truncated_factors(displacement, rank)


def power_times(bands: torch.Tensor, X: torch.Tensor, power: int) -> torch.Tensor:
    """``M^power X`` for the three-band ``M`` of ``bands`` ``(3, n)`` and ``X`` ``(n, k)``,
    by ``power`` stencil steps (``3 n k`` each: far fewer than the dense matrix power's
    ``n^3`` products for ``n`` above ``k``); stops once the product is zero."""
    n = bands.shape[1]
    if n <= 2:  # the periodic bands overlap
        return torch.linalg.matrix_power(bands_to_dense(bands), power) @ X
    shifted = _shift_power(bands, X, power)
    if shifted is not None:
        return shifted
    minus, centre, plus = bands[:, :, None].unbind(0)
    for step in range(power):
        if step % 16 == 0 and not X.any():  # nilpotent (shifts) or zero operators
            break
        X = minus * X.roll(1, 0) + centre * X + plus * X.roll(-1, 0)
    return X


def _shift_power(bands: torch.Tensor, X: torch.Tensor, power: int) -> torch.Tensor | None:
    """``M^power X`` at once for a shift ``M`` (one off-diagonal band of ones, whose wrapped
    entry is a corner ``f``, e.g. ``Z_f``): ``power = q n + r`` rows rolled by ``r``, those
    that wrapped times ``f``, all times ``f^q``. ``None`` for other bands (a 1536 x 384
    start took 384 stencil steps of the whole matrix)."""
    minus, centre, plus = bands
    n = bands.shape[1]
    if centre.any():
        return None
    turns, rest = divmod(power, n)
    if not plus.any() and bool((minus[1:] == 1).all()):  # (M X)[i] = X[i - 1], row 0: f X[n-1]
        corner = float(minus[0])
        result = X.roll(rest, 0)
        result[:rest] *= corner
    elif not minus.any() and bool((plus[:-1] == 1).all()):  # (M X)[i] = X[i + 1], f X[0]
        corner = float(plus[-1])
        result = X.roll(-rest, 0)
        result[n - rest :] *= corner
    else:
        return None
    return result * corner**turns if turns else result


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
    return truncated_factors(solution, rank)


def truncated_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, H)``, ``(rows, rank)`` and ``(cols, rank)``: the balanced truncated SVD
    ``G H^T`` of ``matrix`` (missing ranks are zero)."""
    G, H_T = balanced_truncated_svd(matrix, rank)
    return G, H_T.T.contiguous()
