"""Accuracy and speed of the H-matrix approximator, next to truncated-SVD low rank.

Run from the repository root (one thread, about a minute):

    .venv/bin/python packages/hmat/benchmarks/accuracy.py

Prints three tables: the synthetic matrices MatthiasKi/structurednets 1.0 reported figures for, the
time of ``fit_hmat`` on large matrices, and the weight matrices of an MLP trained on the digits
shipped with structurednets.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from structurednets.datasets import load_digits
from structurednets.numerics import relative_error, torch_threads
from structurednets_hmat import fit_hmat

# Figures MatthiasKi/structurednets 1.0 reported (relative Frobenius error).
STRUCTUREDNETS_1 = {
    ("kernel", 512, 0.1): 4.7e-3,
    ("kernel", 256, 0.25): 6.3e-4,
    ("gaussian", 512, 0.1): 0.907,
    ("gaussian", 512, 0.25): 0.787,
}
SETTINGS = {
    "default (search)": {},
    "min_block_size=16": {"min_block_size": 16},
    "merge_blocks": {"merge_blocks": True},
    "min_block_size=2": {"min_block_size": 2},
}


def kernel(n: int) -> np.ndarray:
    """``W[i, j] = 1 / (1 + |i - j|)``."""
    index = np.arange(n)
    return 1.0 / (1.0 + np.abs(index[:, None] - index[None, :]))


def gaussian(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n))


def lowrank_error(matrix: np.ndarray, share: float) -> float:
    """Relative error of the best low-rank approximation with the same budget."""
    rows, cols = matrix.shape
    rank = int(share * rows * cols) // (rows + cols)
    singular_values = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sqrt(np.sum(singular_values[rank:] ** 2) / np.sum(singular_values**2)))


def hmat_error(matrix: np.ndarray, share: float, **options) -> float:
    budget = int(share * matrix.size)
    return relative_error(fit_hmat(matrix, budget, **options).to_dense(), matrix)


def synthetic_table() -> None:
    print("synthetic matrices: relative error (Frobenius)")
    header = f"{'matrix':<16} {'share':>5} {'sn 1.0':>11} "
    header += " ".join(f"{name:>16}" for name in SETTINGS) + f" {'low rank':>9}"
    print(header)
    for (name, n, share), old in STRUCTUREDNETS_1.items():
        matrix = kernel(n) if name == "kernel" else gaussian(n)
        errors = [hmat_error(matrix, share, **options) for options in SETTINGS.values()]
        print(
            f"{f'{name} {n}x{n}':<16} {share:>5g} {old:>11.3g} "
            + " ".join(f"{error:>16.4g}" for error in errors)
            + f" {lowrank_error(matrix, share):>9.4g}"
        )


def timing_table() -> None:
    print("\ntime of fit_hmat() on a Gaussian matrix, one thread (median of 3)")
    settings = {"default (search)": {}, "min_block_size=16": {"min_block_size": 16}}
    settings["merge_blocks"] = {"merge_blocks": True}
    for n, share in [(512, 0.25), (1024, 0.1), (1024, 0.25), (2048, 0.1), (2048, 0.25)]:
        matrix = gaussian(n)
        line = f"  {n} x {n}, share {share:g}:"
        for name, options in settings.items():
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fit_hmat(matrix, int(share * n * n), **options)
                times.append(time.perf_counter() - start)
            line += f" {np.median(times):6.2f} s {name},"
        print(line.rstrip(","))


def trained_mlp(seed: int = 0, epochs: int = 300) -> nn.Sequential:
    """A 64-256-256-10 MLP trained full-batch with Adam on the digits."""
    torch.manual_seed(seed)
    X, y = load_digits()
    X = torch.from_numpy((X - X.mean(axis=0)) / (X.std(axis=0) + 1e-3))
    y = torch.from_numpy(y)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(X), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    accuracy = float((model(X).argmax(dim=1) == y).float().mean())
    print(f"\ntrained MLP: training loss {loss.item():.4f}, training accuracy {accuracy:.3f}")
    return model


def trained_table() -> None:
    model = trained_mlp()
    layers = {"hidden 256x256": model[2], "first 256x64": model[0]}
    options = {
        "default (search)": {},
        "min_block_size=16": {"min_block_size": 16},
        "min_block_size=32": {"min_block_size": 32},
    }
    print("trained weights: relative error (Frobenius)")
    print(
        f"{'layer':<16} {'share':>5} "
        + " ".join(f"{name:>17}" for name in options)
        + f" {'low rank':>9}"
    )
    for name, layer in layers.items():
        weight = layer.weight.detach().double().numpy()
        for share in (0.1, 0.25, 0.5):
            errors = [hmat_error(weight, share, **option) for option in options.values()]
            print(
                f"{name:<16} {share:>5g} "
                + " ".join(f"{error:>17.4f}" for error in errors)
                + f" {lowrank_error(weight, share):>9.4f}"
            )


if __name__ == "__main__":
    with torch_threads(1):
        synthetic_table()
        timing_table()
        trained_table()
