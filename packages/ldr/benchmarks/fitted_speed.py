"""Speed, predicted cost and error of LDR layers fitted to trained weights, and of random ones.

Run: .venv/bin/python packages/ldr/benchmarks/fitted_speed.py [--share 0.25] [--repeats 9]
(one thread, batch 256, float32; a few minutes). Weights: the demo's trained 256 x 256 digit
MLP hidden layer and, where the packages ``transformers`` and ``all_minilm_l6_v2`` are
installed, all-MiniLM-L6-v2's 384 x 384 query and 1536 x 384 intermediate weights of layer 0.

Columns: fit time and relative error; measured time against ``nn.Linear`` of the same shape
(medians of rounds timed back to back) for the forward pass without gradient (``fwd``) and
forward plus backward with the input's gradient (``f+b``), and the predicted ratios of
``layer.cost(256)`` beside them (``cost``: the training schedule's forward, and forward plus
backward); the same for a randomly initialised layer of the same layout, and the fitted
layer's time against the random one's.
"""

import argparse
import os
import tempfile
import time
import zipfile

import torch
from torch import nn

from structurednets.benchmark import time_against_dense, timed_steps
from structurednets.cost import dense_cost
from structurednets.demo import _mlp, _split, _train
from structurednets_ldr import LDRLayer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--share", type=float, default=0.25)
parser.add_argument("--repeats", type=int, default=9)
arguments = parser.parse_args()
torch.set_num_threads(1)
BATCH = 256


def demo_weight() -> torch.Tensor:
    torch.manual_seed(0)
    model = _mlp()
    _train(model, _split(0), 30, 0)
    return model.hidden.weight.detach()


def minilm_weights() -> dict[str, torch.Tensor]:
    try:
        import transformers
        from all_minilm_l6_v2 import get_model_zip_path
    except ImportError:
        return {}
    folder = tempfile.mkdtemp(prefix="minilm-")
    zipfile.ZipFile(get_model_zip_path()).extractall(folder)
    config = next(root for root, _, files in os.walk(folder) if "config.json" in files)
    state = transformers.AutoModel.from_pretrained(config).state_dict()
    return {
        "MiniLM query 384x384": state["encoder.layer.0.attention.self.query.weight"],
        "MiniLM intermediate 1536x384": state["encoder.layer.0.intermediate.dense.weight"],
    }


def speed(layer: nn.Module, dense: nn.Module, U: torch.Tensor) -> tuple[float, float]:
    """Median time ratios of ``layer`` against ``dense``: forward, forward + backward."""
    (forward, train), (dense_forward, dense_train) = timed_steps(layer, U), timed_steps(dense, U)
    forward_ratio = time_against_dense(forward, dense_forward, arguments.repeats)[2]
    train_ratio = time_against_dense(train, dense_train, arguments.repeats)[2]
    return forward_ratio, train_ratio


weights = {"demo digit MLP hidden 256x256": demo_weight(), **minilm_weights()}
print(f"share {arguments.share}, batch {BATCH}, float32, 1 thread")
print(
    f"{'weight':<30} {'layer':<7} {'r':>3} {'fit s':>6} {'error':>7} "
    f"{'fwd':>6} {'cost':>6} {'f+b':>6} {'cost':>6}"
)
for name, matrix in weights.items():
    out_dim, in_dim = matrix.shape
    dense = nn.Linear(in_dim, out_dim)
    U = torch.randn(BATCH, in_dim)
    started = time.perf_counter()
    fitted = LDRLayer(in_dim, out_dim, arguments.share, initial_weight_matrix=matrix)
    seconds = time.perf_counter() - started
    random = LDRLayer(in_dim, out_dim, arguments.share)
    reference = dense_cost(in_dim, out_dim, BATCH)
    for kind, layer, fit_seconds, error in (
        ("fitted", fitted, f"{seconds:6.1f}", f"{fitted.fit_relative_error:7.4f}"),
        ("random", random, f"{'':>6}", f"{'':>7}"),
    ):
        cost = layer.cost(BATCH)
        forward_ratio, train_ratio = speed(layer, dense, U)
        print(
            f"{name:<30} {kind:<7} {layer.displacement_rank:>3} {fit_seconds} {error} "
            f"{forward_ratio:6.2f} {cost.forward_ratio(reference):6.2f} "
            f"{train_ratio:6.2f} {cost.ratio(reference):6.2f}",
            flush=True,
        )
    forward_ratio, train_ratio = speed(fitted, random, U)
    print(f"{name:<30} fitted / random time: fwd {forward_ratio:.2f}, f+b {train_ratio:.2f}")
