"""Accuracy and time of the LDR approximator on matrices that are not LDR matrices.

Run: .venv/bin/python packages/ldr/benchmarks/fit_other_targets.py   (one thread, ~1.5 min)
"""

import time

import numpy as np
import torch

from structurednets.demo import _mlp, _split, _train
from structurednets_ldr import displacement_rank_for
from structurednets_ldr.fit import fit_ldr

torch.set_num_threads(1)
rng = np.random.default_rng(0)


def smooth(n: int) -> np.ndarray:
    x = np.linspace(0, 1, n)
    return np.exp(-5 * (x[:, None] - x[None, :]) ** 2) + 0.3 * np.sin(7 * x[:, None] * x[None, :])


def low_rank_plus_noise(n: int, share: float) -> np.ndarray:
    r = displacement_rank_for(n, n, share)
    matrix = rng.standard_normal((n, 2 * r)) @ rng.standard_normal((2 * r, n))
    return matrix + 0.01 * np.linalg.norm(matrix) / n * rng.standard_normal((n, n))


def trained_hidden_layer() -> np.ndarray:
    """The demo's trained 256 x 256 hidden layer (digits, seed 0)."""
    torch.manual_seed(0)
    model = _mlp()
    _train(model, _split(0), 30, 0)
    return model.hidden.weight.detach().double().numpy()


i = np.arange(256)
toeplitz = 1.0 / (1.0 + np.abs(i[:, None] - i[None, :]))
targets = [
    ("exp(-5 (x-y)^2) + 0.3 sin(7 x y), 64", smooth(64), 0.25),
    ("exp(-5 (x-y)^2) + 0.3 sin(7 x y), 128", smooth(128), 0.1),
    ("Gaussian 256", rng.standard_normal((256, 256)), 0.1),
    (
        "Toeplitz + 1e-3 noise, 256",
        toeplitz + 1e-3 * np.abs(toeplitz).mean() * rng.standard_normal((256, 256)),
        0.1,
    ),
    ("trained digit MLP hidden layer, 256", trained_hidden_layer(), 0.05),
    ("rank 2r + 1% noise, 64", low_rank_plus_noise(64, 0.25), 0.25),
    ("rank 2r + 1% noise, 128", low_rank_plus_noise(128, 0.1), 0.1),
]
for name, matrix, share in targets:
    out_dim, in_dim = matrix.shape
    rank = displacement_rank_for(in_dim, out_dim, share)
    started = time.perf_counter()
    fit = fit_ldr(torch.from_numpy(matrix), rank, min(out_dim, in_dim))
    seconds = time.perf_counter() - started
    print(f"{name:<40} share {share:<5} r {rank:<3} {fit.relative_error:9.3g}  {seconds:5.1f} s")
