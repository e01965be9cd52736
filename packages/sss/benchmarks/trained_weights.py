"""SSS approximation of trained weight matrices, next to low rank at the same budget.

Trains small MLPs on the digits shipped with structurednets (64 -> h -> h -> 10, ReLU, Adam,
seeded) and fits SSS layers to their weight matrices. Run from the repository root::

    .venv/bin/python packages/sss/benchmarks/trained_weights.py

Prints, per matrix and share, the relative Frobenius error of the SSS fit, that of the
truncated SVD with as many parameters, and the stages/state dimensions chosen.
"""

from __future__ import annotations

import numpy as np
import torch
from fit_accuracy import lowrank_error
from torch import nn

from structurednets.datasets import load_digits
from structurednets.testing import default_dtype
from structurednets_sss import SSSLayer


def train_mlp(hidden: int, epochs: int = 300, seed: int = 0) -> nn.Sequential:
    """A 64 -> hidden -> hidden -> 10 MLP trained full-batch with Adam on 3/4 of the digits."""
    torch.manual_seed(seed)
    X, y = load_digits()
    X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-3)
    order = np.random.default_rng(seed).permutation(len(X))
    train, test = order[len(X) // 4 :], order[: len(X) // 4]
    X_t, y_t = torch.from_numpy(X), torch.from_numpy(y)
    model = nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(X_t[train]), y_t[train])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        accuracy = (model(X_t[test]).argmax(1) == y_t[test]).float().mean().item()
    print(f"MLP 64-{hidden}-{hidden}-10: test accuracy {accuracy:.3f}")
    return model


def report(name: str, weight: np.ndarray, shares: list[float]) -> None:
    m, n = weight.shape
    for share in shares:
        with default_dtype(torch.float64):
            layer = SSSLayer(n, m, share, initial_weight_matrix=weight)
            dense = layer.to_dense().detach().numpy()
        error = np.linalg.norm(dense - weight) / np.linalg.norm(weight)
        sizes = layer.sizes
        print(
            f"{name:<28} {m:>4}x{n:<4} share {share:<5g} sss {error:.4f}  "
            f"lowrank {lowrank_error(weight, share):.4f}  K={sizes.nb_stages:<3} "
            f"dims {min(sizes.causal_dims, default=0)}..{max(sizes.causal_dims, default=0)} / "
            f"{min(sizes.anticausal_dims, default=0)}..{max(sizes.anticausal_dims, default=0)}",
            flush=True,
        )


def main() -> None:
    torch.set_num_threads(1)
    shares = [0.1, 0.25, 0.5]
    for hidden in (256, 512):
        model = train_mlp(hidden)
        report(
            f"hidden {hidden}: layer 2 (h x h)", model[2].weight.detach().double().numpy(), shares
        )
        report(
            f"hidden {hidden}: layer 1 (h x 64)", model[0].weight.detach().double().numpy(), shares
        )
        init = nn.Linear(hidden, hidden).weight.detach().double().numpy()
        report(f"hidden {hidden}: untrained init", init, shares[:2])


if __name__ == "__main__":
    main()
