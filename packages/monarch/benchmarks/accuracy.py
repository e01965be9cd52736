"""Relative error of the Monarch projection next to low rank and psm, on trained weights.

Run from the repository root (one thread, as the figures in the README; ~2 min with psm):

    .venv/bin/python packages/monarch/benchmarks/accuracy.py
    .venv/bin/python packages/monarch/benchmarks/accuracy.py --shares 0.05 0.1 --no-psm

The targets are the weights of the demo's digit classifier (the 64-256-256-10 MLP that
``structurednets demo`` trains, seed 0): its 256 x 256 hidden layer and its 256 x 64 first
layer; then a smooth kernel and a Gaussian matrix for contrast. Columns: ``monarch`` is the
fit with its default search over block counts (the layout it picked in the last column),
``monarch sqrt`` the projection onto the layout a random start takes (about sqrt(dim)
blocks per side), ``lowrank`` the truncated SVD, ``psm`` the psm plugin's fit (when
installed). All errors are ``||W - W~||_F / ||W||_F`` in float64.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from structurednets.demo import _mlp, _split, _train
from structurednets.testing import default_dtype
from structurednets.validation import BudgetTooSmallError, weight_budget
from structurednets_monarch import fit_monarch, plan_monarch


def trained_layers() -> dict[str, np.ndarray]:
    """The demo's trained weights (digits, seed 0, 30 epochs as the demo trains)."""
    torch.manual_seed(0)
    model = _mlp()
    _train(model, _split(0), 30, 0)
    return {
        "digits hidden 256x256": model.hidden.weight.detach().double().numpy(),
        "digits first 256x64": model.input.weight.detach().double().numpy(),
    }


def contrast_matrices() -> dict[str, np.ndarray]:
    x, y = np.linspace(0, 1, 512), np.linspace(0, 1, 256)
    return {
        "kernel 256x512": 1.0 / (1.0 + 50.0 * np.abs(y[:, None] - x[None, :])),
        "Gaussian 256x256": np.random.default_rng(0).standard_normal((256, 256)),
    }


def relative(approximation: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(approximation - target) / np.linalg.norm(target))


def lowrank_error(target: np.ndarray, share: float) -> float:
    rows, cols = target.shape
    rank = weight_budget(cols, rows, share) // (rows + cols)
    if rank < 1:
        return float("nan")
    S = np.linalg.svd(target, compute_uv=False)
    return float(np.sqrt(np.sum(S[rank:] ** 2)) / np.linalg.norm(target))


def psm_error(target: np.ndarray, share: float) -> float:
    import structurednets

    rows, cols = target.shape
    try:
        with default_dtype(torch.float64):
            layer = structurednets.create("psm", cols, rows, share, initial_weight_matrix=target)
    except BudgetTooSmallError:
        return float("nan")
    return relative(layer.to_dense().detach().numpy(), target)


def monarch_errors(target: np.ndarray, share: float) -> tuple[float, float, str, float]:
    rows, cols = target.shape
    matrix = torch.from_numpy(target)
    budget = weight_budget(cols, rows, share)
    start = time.perf_counter()
    fit = fit_monarch(matrix, budget)
    seconds = time.perf_counter() - start
    shape = plan_monarch(cols, rows, share)
    sqrt_fit = fit_monarch(
        matrix, budget, nb_blocks=(shape.nb_input_blocks, shape.nb_output_blocks)
    )
    picked = f"k={fit.shape.nb_input_blocks} q={fit.shape.nb_output_blocks} r={fit.shape.rank}"
    return fit.relative_error, sqrt_fit.relative_error, picked, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.25])
    parser.add_argument("--no-psm", action="store_true", help="skip the psm fits (slowest)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    use_psm = not args.no_psm
    if use_psm:
        import structurednets

        use_psm = "psm" in structurednets.available()
    targets = {**trained_layers(), **contrast_matrices()}
    print(
        f"{'matrix':<22} {'share':>5} {'monarch':>8} {'sqrt':>8} {'lowrank':>8} {'psm':>8}"
        f" {'fit s':>6}  monarch layout"
    )
    for name, target in targets.items():
        for share in args.shares:
            try:
                error, sqrt_error, picked, seconds = monarch_errors(target, share)
            except BudgetTooSmallError:
                print(f"{name:<22} {share:>5g} budget too small for monarch")
                continue
            psm = psm_error(target, share) if use_psm else float("nan")
            print(
                f"{name:<22} {share:>5g} {error:>8.4f} {sqrt_error:>8.4f} "
                f"{lowrank_error(target, share):>8.4f} {psm:>8.4f} {seconds:>6.2f}  {picked}"
            )


if __name__ == "__main__":
    main()
