"""Speed of SSS layers fitted to trained weights: measured time against predicted cost.

For each trained matrix and share, fits an SSS layer (default options, then with the cost
bound ``max_cost_ratio`` where given) and times it against ``nn.Linear`` of the same shape in
the same run: one thread, batch 256, float32, medians of interleaved repeats, forward without
gradients and forward+backward with the input's gradient. Run from the repository root::

    .venv/bin/python packages/sss/benchmarks/fitted_speed.py [--minilm DIR] [--clock cpu]

The matrices: the 256 x 256 hidden layer of the digit MLP of ``trained_weights.py``, and,
when ``--minilm`` names an extracted all-MiniLM-L6-v2 folder (needs ``transformers``), its
384 x 384 attention query and 1536 x 384 intermediate weights of layer 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from trained_weights import train_mlp

from structurednets.cost import dense_cost
from structurednets_sss import SSSLayer

BATCH = 256
#: The clock: wall time, or this thread's CPU time (steadier on a shared machine, and the
#: same thing for one torch thread when nothing else competes for the core).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = time.perf_counter


def _median_time(step, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
    return statistics.median(times)


def time_ratios(layer: nn.Module, dense: nn.Linear, repeats: int) -> tuple[float, float]:
    """(forward, forward+backward) median time of ``layer`` over that of ``dense``."""
    U = torch.randn(BATCH, dense.in_features)
    U_grad = U.clone().requires_grad_(True)

    def forward(module):
        with torch.no_grad():
            module(U)

    def both(module):
        module(U_grad).sum().backward()
        U_grad.grad = None

    ratios = []
    for step in (forward, both):
        for _ in range(3):  # warm up
            step(layer)
            step(dense)
        layer_times, dense_times = [], []
        for _ in range(repeats):  # interleaved, so that both see the same machine load
            layer_times.append(_median_time(lambda s=step: s(layer), 3))
            dense_times.append(_median_time(lambda s=step: s(dense), 3))
        ratios.append(statistics.median(layer_times) / statistics.median(dense_times))
    return ratios[0], ratios[1]


def report(name: str, weight: torch.Tensor, share: float, repeats: int, **options) -> None:
    m, n = weight.shape
    start = time.perf_counter()
    layer = SSSLayer(n, m, share, initial_weight_matrix=weight, **options)
    seconds = time.perf_counter() - start
    error = float(torch.linalg.norm(layer.to_dense().detach() - weight) / torch.linalg.norm(weight))
    dense = nn.Linear(n, m)
    forward, both = time_ratios(layer, dense, repeats)
    cost = layer.cost(BATCH)
    reference = dense_cost(n, m, BATCH)
    bound = options.get("max_cost_ratio")
    label = f"{name} {share:g}" + ("" if bound is None else f" <={bound:g}")
    print(
        f"{label:<30} {m:>4}x{n:<4} err {error:.4f}  fwd {forward:5.2f} "
        f"({cost.forward_ratio(reference):.2f})  f+b {both:5.2f} ({cost.ratio(reference):.2f})"
        f"  K={layer.nb_stages:<3} params {layer.sizes.nb_weight_parameters}"
        f" padded {layer.sizes.padded_nb_parameters}  fit {seconds:.1f}s",
        flush=True,
    )


def minilm_weights(folder: str) -> dict[str, torch.Tensor]:
    """The 384 x 384 query and 1536 x 384 intermediate weights of layer 0 of all-MiniLM-L6-v2."""
    import transformers

    model = transformers.AutoModel.from_pretrained(folder)
    state = model.state_dict()
    return {
        "minilm query": state["encoder.layer.0.attention.self.query.weight"].detach().float(),
        "minilm intermediate": state["encoder.layer.0.intermediate.dense.weight"].detach().float(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--minilm", default=None, help="an extracted all-MiniLM-L6-v2 folder")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument(
        "--bounds", type=float, nargs="*", default=[0.2], help="max_cost_ratio values to fit with"
    )
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    arguments = parser.parse_args()
    global clock
    clock = CLOCKS[arguments.clock]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = {"digit MLP hidden": train_mlp(256)[2].weight.detach().float()}
    if arguments.minilm:
        weights.update(minilm_weights(arguments.minilm))
    print(
        f"{arguments.clock} time ratio to nn.Linear (predicted cost ratio in parentheses), "
        "batch 256, 1 thread"
    )
    for name, weight in weights.items():
        for share in arguments.shares:
            report(name, weight, share, arguments.repeats)
            for bound in arguments.bounds:
                report(name, weight, share, arguments.repeats, max_cost_ratio=bound)


if __name__ == "__main__":
    main()
