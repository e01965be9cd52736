"""Accuracy and time of the LDR approximator on the targets of the LDR issue (256 x 256).

Run: .venv/bin/python packages/ldr/benchmarks/fit_targets.py [--seeds N]   (one thread)

Generated targets: cyclic shifts ``A = Z_1``, ``B = Z_(-1)^T`` with Gaussian noise of 0%,
1%, 5% and 10% on every nonzero, random ``G``, ``H``; seeds ``0 .. N-1`` (default 3).
"""

import argparse
import time

import numpy as np
import torch

from structurednets_ldr import LDRLayer, cyclic_shift_bands, displacement_rank_for, weight

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seeds", type=int, default=3, help="seeds per noise level")
seeds = parser.parse_args().seeds
torch.set_num_threads(1)
n, share = 256, 0.1
rank = displacement_rank_for(n, n, share)


def report(name: str, target: np.ndarray | torch.Tensor) -> tuple[float, float]:
    target = np.asarray(target, dtype=np.float64)
    started = time.perf_counter()
    layer = LDRLayer(n, n, share, initial_weight_matrix=target)
    seconds = time.perf_counter() - started
    dense = layer.to_dense().detach().double().numpy()
    float32_error = np.linalg.norm(dense - target) / np.linalg.norm(target)
    print(
        f"{name:<44} fit (float64) {layer.fit_relative_error:9.2e}   "
        f"layer (float32) {float32_error:9.2e}   {seconds:5.1f} s"
    )
    return layer.fit_relative_error, seconds


i = np.arange(n)
kernel = 1.0 / (1.0 + np.abs(i[:, None] - i[None, :]))
singular_values = np.linalg.svd(kernel, compute_uv=False)
low_rank = int(share * n * n) // (2 * n)
low_rank_error = np.sqrt(np.sum(singular_values[low_rank:] ** 2) / np.sum(singular_values**2))
print(
    f"{n} x {n}, share {share}: displacement rank {rank}; low rank {low_rank} for the same budget"
)
print(f"{'Toeplitz 1/(1+|i-j|), low rank':<44} {low_rank_error:9.3f}")
report("Toeplitz 1/(1+|i-j|), LDR", kernel)
for noise in (0.0, 0.01, 0.05, 0.1):
    errors, times = [], []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)

        def normal(*shape, generator=generator):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        A = cyclic_shift_bands(n, 1.0, dtype=torch.float64) + noise * normal(3, n)
        B = cyclic_shift_bands(n, -1.0, down=False, dtype=torch.float64) + noise * normal(3, n)
        target = weight(A, B, normal(n, rank), normal(n, rank), n, 4)
        error, seconds = report(
            f"generated, shifts + {noise:.0%} noise, seed {seed}", target.detach()
        )
        errors.append(error)
        times.append(seconds)
    print(
        f"  {noise:.0%} noise: worst {max(errors):.1e}, {sum(e <= 1e-3 for e in errors)} of "
        f"{seeds} <= 1e-3; {min(times):.1f} to {max(times):.1f} s"
    )
