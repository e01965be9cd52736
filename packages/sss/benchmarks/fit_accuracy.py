"""Accuracy and time of the SSS fit next to low rank's truncated SVD at the same budget.

Run from the repository root (one thread, float64 layers)::

    .venv/bin/python packages/sss/benchmarks/fit_accuracy.py

Prints, per matrix and share: the relative Frobenius error of the SSS layer fitted to the
matrix, the chosen number of stages and state dimensions, the fitting time, and the error of
the best low-rank approximation with at most as many parameters (numpy SVD, computed here).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from structurednets.testing import default_dtype
from structurednets_sss import SSSLayer


def smooth_kernel(n: int) -> np.ndarray:
    """W[i, j] = 1 / (1 + |i - j|)."""
    index = np.arange(n)
    return 1.0 / (1.0 + np.abs(index[:, None] - index[None, :]))


def gaussian(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n))


def lowrank_error(target: np.ndarray, share: float) -> float:
    """Relative error of the truncated SVD with rank floor(share * m * n / (m + n))."""
    m, n = target.shape
    rank = int(share * m * n * (1 + 1e-12)) // (m + n)
    singular_values = np.linalg.svd(target, compute_uv=False)
    return float(np.sqrt(np.sum(singular_values[rank:] ** 2) / np.sum(singular_values**2)))


def fit(target: np.ndarray, share: float) -> tuple[SSSLayer, float, float]:
    """The fitted layer (float64), its relative error and the seconds the fit took."""
    m, n = target.shape
    start = time.perf_counter()
    with default_dtype(torch.float64):
        layer = SSSLayer(n, m, share, initial_weight_matrix=target)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        error = float(np.linalg.norm(layer.to_dense().numpy() - target) / np.linalg.norm(target))
    return layer, error, seconds


def report(name: str, target: np.ndarray, shares: list[float]) -> None:
    for share in shares:
        layer, error, seconds = fit(target, share)
        sizes = layer.sizes
        print(
            f"{name:<24} {target.shape[0]:>5}x{target.shape[1]:<5} share {share:<5g} "
            f"sss {error:10.3e}  lowrank {lowrank_error(target, share):10.3e}  "
            f"K={sizes.nb_stages:<4} dims {min(sizes.causal_dims, default=0)}.."
            f"{max(sizes.causal_dims, default=0)} / {min(sizes.anticausal_dims, default=0)}.."
            f"{max(sizes.anticausal_dims, default=0)}  params {layer.nb_weight_parameters:>7}/"
            f"{layer.weight_budget:<7}  fit {seconds:6.2f} s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for n in args.sizes:
        report("1/(1+|i-j|)", smooth_kernel(n), args.shares)
        report("gaussian", gaussian(n), args.shares)


if __name__ == "__main__":
    main()
