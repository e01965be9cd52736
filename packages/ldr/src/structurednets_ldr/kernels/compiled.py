"""Compiled CPU kernels that build ``W`` when no gradient is wanted (inference), with numba.

The torch kernels of :mod:`structurednets_ldr.kernels.forms` issue hundreds of small operations
per ``W`` (coarse steps, then ``b - 1`` Horner steps of two stencils with five operations
each); on CPU each costs 1.5 to 2 us of dispatch, which dominates below about 256 x 256
(at 128 x 128, ``r = 3``: about 400 us for 50 us of arithmetic). Here the same evaluation
runs as two compiled loops and one matrix product:

1. the chain starts ``S_A = [G, A^b G, A^(2b) G, ...]`` and ``S_B = [H, (B^T)^b H, ...]``
   by ``m - 1`` sequential three-band steps on the ``r`` generators, kept every ``b``-th;
2. ``W_0 = S_A S_B^T`` (and ``W_0`` without the last, cut chain) by torch's ``mm``;
3. Horner's rule ``H_(b-1) = W_0``, ``H_l = W_0 + A H_(l+1) B``, each step one fused pass
   over ``out x in`` (both stencils and the addition, row by row).

Only the forward pass is compiled: training runs the torch kernels, whose hand-written
backward needs their intermediates. numba compiles the kernels on their first call per dtype
(about 4 s; then 0.3 s per process from numba's disk cache); without numba, for dtypes other
than float32 and float64, or off the CPU, :func:`supports` is false and the torch kernels
run.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

from structurednets_ldr.kernels.krylov import even_chains
from structurednets_ldr.kernels.scratch import scratch

__all__ = ["AVAILABLE", "supports", "weight"]

#: Whether numba is installed (it is imported, and the kernels compiled, on first use).
AVAILABLE = importlib.util.find_spec("numba") is not None

_DTYPES = (torch.float32, torch.float64)


def supports(tensor: torch.Tensor) -> bool:
    """Whether :func:`weight` can run on ``tensor``'s device and dtype."""
    return AVAILABLE and tensor.device.type == "cpu" and tensor.dtype in _DTYPES


def weight(
    A_bands: torch.Tensor,
    B_bands: torch.Tensor,
    G: torch.Tensor,
    H: torch.Tensor,
    nb_columns: int,
    chain: int,
) -> torch.Tensor:
    """``W = sum_(k<m) A^k G H^T B^k`` ``(out, in)``, without autograd (a fresh tensor).

    Needs :func:`supports` of the inputs; ``A_bands`` ``(3, out)``, ``B_bands`` ``(3, in)``,
    ``G`` ``(out, r)``, ``H`` ``(in, r)``, all of one dtype. ``chain``: the chain length
    ``b`` (evened out like the torch kernels'; the cost model's choice is
    :func:`structurednets_ldr.schedule.compiled_chain_length`).
    """
    out_dim, in_dim, rank = A_bands.shape[1], B_bands.shape[1], G.shape[1]
    b, nb_chains = even_chains(nb_columns, chain)
    last = nb_columns - (nb_chains - 1) * b
    with torch.no_grad():
        A = A_bands.detach().contiguous()
        B = B_bands.detach().contiguous()
        S_A = G.new_empty(nb_chains * rank, out_dim)
        S_B = G.new_empty(nb_chains * rank, in_dim)
        _kernels().starts(
            A.numpy(), False, G.detach().T.contiguous().numpy(), nb_chains, b, S_A.numpy()
        )
        _kernels().starts(
            B.numpy(), True, H.detach().T.contiguous().numpy(), nb_chains, b, S_B.numpy()
        )
        shape = (out_dim, in_dim)
        W = G.new_empty(shape)
        W0 = W if b == 1 else scratch("W0", shape, G)
        if last < b:  # the Horner steps past the end of the cut chain leave it out
            cut = (nb_chains - 1) * rank
            W0_cut = torch.mm(S_A[:cut].T, S_B[:cut], out=scratch("W0_cut", shape, G))
            torch.addmm(W0_cut, S_A[cut:].T, S_B[cut:], out=W0)
        else:
            W0_cut = torch.mm(S_A.T, S_B, out=W0)
        if b > 1:
            work = scratch("horner", (2, *shape), G).numpy()
            _kernels().horner(
                A.numpy(), B.numpy(), W0.numpy(), W0_cut.numpy(), b, last, work, W.numpy()
            )
    return W


class _Kernels:
    """The numba kernels, compiled on first use per dtype and cached on disk where numba
    finds a writable place (else compiled once per process)."""

    def __init__(self) -> None:
        import numba

        def compile(function):
            try:
                return numba.njit(cache=True, nogil=True, fastmath=True)(function)
            except RuntimeError:  # no writable cache location
                return numba.njit(nogil=True, fastmath=True)(function)

        self.starts = compile(_starts)
        self.horner = compile(_horner)


@functools.cache
def _kernels() -> _Kernels:
    return _Kernels()


# -- the kernels (plain Python for numba: loops over numpy arrays) ---------------------------


def _starts(bands, transposed, X, nb_chains, chain, out):  # pragma: no cover - compiled
    """``out[J r + k] = T^(J b) X[k]`` for ``J < nb_chains``: ``T`` has ``bands``
    ``(3, n)``, or is the transpose of that matrix (``transposed``); ``X`` ``(r, n)``."""
    r, n = X.shape
    lower = np.empty(n, X.dtype)  # T[i, i - 1], T[i, i], T[i, i + 1], indices modulo n
    centre = bands[1].copy()
    upper = np.empty(n, X.dtype)
    for i in range(n):
        if transposed:  # T[i, i - 1] = M[i - 1, i], T[i, i + 1] = M[i + 1, i]
            lower[i] = bands[2, (i - 1) % n]
            upper[i] = bands[0, (i + 1) % n]
        else:
            lower[i] = bands[0, i]
            upper[i] = bands[2, i]
    x = np.empty((r, n + 2), X.dtype)  # one periodic halo entry on each side
    y = np.empty((r, n + 2), X.dtype)
    x[:, 1 : n + 1] = X
    out[:r] = X
    for J in range(1, nb_chains):
        for _ in range(chain):
            for k in range(r):
                xk, yk = x[k], y[k]
                xk[0] = xk[n]
                xk[n + 1] = xk[1]
                for i in range(n):
                    yk[i + 1] = lower[i] * xk[i] + centre[i] * xk[i + 1] + upper[i] * xk[i + 2]
            x, y = y, x
        out[J * r : (J + 1) * r] = x[:, 1 : n + 1]


def _horner(A_bands, B_bands, W0, W0_cut, chain, last, work, W):  # pragma: no cover
    """``W = H_0`` of Horner's rule ``H_(b-1) = W_0``, ``H_l = W_0 + A H_(l+1) B``, with
    ``W0_cut`` in place of ``W0`` for ``l >= last``; ``chain`` ``b >= 2``; ``work``
    ``(2, out, in)`` holds ``H_(l+1)`` and ``H_l`` in turn."""
    out_dim, in_dim = W0.shape
    # (X B)[:, j] = X[:, j - 1] B[j - 1, j] + X[:, j] B[j, j] + X[:, j + 1] B[j + 1, j]
    left = np.empty(in_dim, W0.dtype)
    centre = B_bands[1].copy()
    right = np.empty(in_dim, W0.dtype)
    for j in range(in_dim):
        left[j] = B_bands[2, (j - 1) % in_dim]
        right[j] = B_bands[0, (j + 1) % in_dim]
    current, following = work[0], work[1]
    current[:] = W0 if chain - 1 < last else W0_cut
    x = np.empty(in_dim + 2, W0.dtype)  # a row of A H, with one periodic halo entry per side
    for step in range(chain - 2, -1, -1):
        base = W0 if step < last else W0_cut
        target = W if step == 0 else following
        for row in range(out_dim):
            above = row - 1 if row > 0 else out_dim - 1
            below = row + 1 if row < out_dim - 1 else 0
            a0, a1, a2 = A_bands[0, row], A_bands[1, row], A_bands[2, row]
            h0, h1, h2 = current[above], current[row], current[below]
            for j in range(in_dim):
                x[j + 1] = a0 * h0[j] + a1 * h1[j] + a2 * h2[j]
            x[0] = x[in_dim]
            x[in_dim + 1] = x[1]
            t, w0 = target[row], base[row]
            for j in range(in_dim):
                t[j] = w0[j] + left[j] * x[j] + centre[j] * x[j + 1] + right[j] * x[j + 2]
        current, following = following, current
