"""Accuracy and time of the PSM approximator on Gaussian, Toeplitz-like and Hadamard matrices.

Run from the repository root (one thread, as the figures in the README):

    .venv/bin/python packages/psm/benchmarks/accuracy.py            # everything (~1 min)
    .venv/bin/python packages/psm/benchmarks/accuracy.py --only gaussian toeplitz

Prints the relative Frobenius error ``||W - S_1 ... S_J|| / ||W||`` of the fitted layer
(float64 factors), the fit's wall time, and the strategy the search picked. The reference
column is what MatthiasKi/structurednets 1.0 reaches with FAuST's hierarchical factorisation
(best of 17 splits x J in {2, 3}); for the Toeplitz-like matrix we measured it ourselves with
pyfaust 3.41 in the same configuration (9 splits instead of 17 at 128 x 128). The top-k
column is the plain sparse matrix keeping the budget's largest entries.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg
import torch

from structurednets.testing import default_dtype
from structurednets_psm import PSMLayer

REFERENCE = {
    ("gaussian", 128, 0.1): 0.751,
    ("gaussian", 128, 0.25): 0.485,
    ("gaussian", 64, 0.5): 0.218,
    ("toeplitz", 64, 0.5): 0.0098,
    ("toeplitz", 128, 0.1): 0.1358,
    ("toeplitz", 128, 0.25): 0.0180,
}


def gaussian(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, n))


def toeplitz(n: int) -> np.ndarray:
    i = np.arange(n)
    return 1.0 / (1.0 + np.abs(i[:, None] - i[None, :]))


def fit(target: np.ndarray, share: float, **options) -> tuple[float, float, PSMLayer]:
    start = time.perf_counter()
    with default_dtype(torch.float64):
        layer = PSMLayer(
            target.shape[1], target.shape[0], share, initial_weight_matrix=target, **options
        )
    elapsed = time.perf_counter() - start
    dense = layer.to_dense().detach().numpy()
    return float(np.linalg.norm(dense - target) / np.linalg.norm(target)), elapsed, layer


def largest_entries_error(target: np.ndarray, share: float) -> float:
    """Error of the plain sparse matrix keeping the budget's largest entries."""
    budget = int(share * target.size)
    threshold = np.sort(np.abs(target).ravel())[-budget]
    kept = np.where(np.abs(target) >= threshold, target, 0.0)
    return float(np.linalg.norm(target - kept) / np.linalg.norm(target))


def describe(layer: PSMLayer) -> str:
    strategy = layer.fit.strategy
    return (
        f"J={layer.nb_matrices} nnz={[f.nnz for f in layer.factors]} {strategy.projection}/"
        f"{strategy.update_way}/continuation {strategy.continuation:g}"
    )


def row(name: str, n: int, share: float, error: float, elapsed: float, layer, target=None) -> str:
    reference = REFERENCE.get((name, n, share))
    reference = f"{reference:7.4f}" if reference else f"{'-':>7}"
    top = f"{largest_entries_error(target, share):7.4f}" if target is not None else f"{'-':>7}"
    shown = f"{error:10.2e}" if error < 1e-3 else f"{error:10.4g}"
    return (
        f"{name:<10} {n:>5} {share:>6.3g} {shown} {reference} {top} {elapsed:>6.1f}  "
        f"{describe(layer)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["gaussian", "toeplitz", "hadamard", "time"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{'matrix':<10} {'size':>5} {'share':>6} {'error':>10} {'FAuST':>7} {'top-k':>7} "
        f"{'fit s':>6}  strategy"
    )
    for name, make in (("gaussian", gaussian), ("toeplitz", toeplitz)):
        if name in args.only:
            for n, share in ((128, 0.1), (128, 0.25), (64, 0.5)):
                target = make(n)
                error, elapsed, layer = fit(target, share)
                print(row(name, n, share, error, elapsed, layer, target))
    if "hadamard" in args.only:
        for k in range(2, 9):
            n = 2**k
            target = scipy.linalg.hadamard(n).astype(np.float64)
            error, elapsed, layer = fit(target, 2 * k / n, nb_matrices=k)
            print(row("hadamard", n, 2 * k / n, error, elapsed, layer))
    if "time" in args.only:
        target = gaussian(512)
        error, elapsed, layer = fit(target, 0.25)
        print(row("gaussian", 512, 0.25, error, elapsed, layer, target))


if __name__ == "__main__":
    main()
