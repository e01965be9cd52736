"""Speed of structured layers relative to ``nn.Linear`` of the same shape, in the same process.

Timings on a shared machine are noisy, so every figure is a median over repeated rounds, and
each round times the structured layer and ``nn.Linear`` back to back: the ratio of a round is
robust to slow drifts of the machine's speed, and the reported ratio is the median of those.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from structurednets.registry import available, create

__all__ = ["BenchmarkResult", "format_table", "run_benchmark", "time_against_dense", "timed_steps"]


@dataclass(frozen=True)
class BenchmarkResult:
    """One structure at one size: medians in milliseconds and ratios to ``nn.Linear``.

    ``train`` means forward plus backward (gradients for the parameters and the input).
    """

    structure: str
    input_dim: int
    output_dim: int
    nb_params_share: float
    batch_size: int
    nb_parameters: int
    dense_nb_parameters: int
    forward_ms: float
    dense_forward_ms: float
    forward_ratio: float
    train_ms: float
    dense_train_ms: float
    train_ratio: float


def _calibrate(step: Callable[[], Any], target_seconds: float) -> int:
    """How many calls of ``step`` take about ``target_seconds`` (at least one)."""
    start = time.perf_counter()
    step()
    elapsed = max(time.perf_counter() - start, 1e-7)
    return max(1, int(target_seconds / elapsed))


def _time(step: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def time_against_dense(
    step: Callable[[], Any],
    dense_step: Callable[[], Any],
    repeats: int = 15,
    target_seconds: float = 0.02,
) -> tuple[float, float, float]:
    """Median seconds per call of ``step`` and of ``dense_step``, and the median of the
    per-round ratios; each round times both back to back."""
    for _ in range(3):  # warm up caches, allocator and any lazy initialisation
        step()
        dense_step()
    calls = _calibrate(step, target_seconds)
    dense_calls = _calibrate(dense_step, target_seconds)
    times, dense_times, ratios = [], [], []
    for _ in range(repeats):
        times.append(_time(step, calls))
        dense_times.append(_time(dense_step, dense_calls))
        ratios.append(times[-1] / dense_times[-1])
    return statistics.median(times), statistics.median(dense_times), statistics.median(ratios)


def timed_steps(layer: nn.Module, U: torch.Tensor) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The two steps timed: ``forward`` without gradients (inference) and ``train``, forward
    plus backward with the input's gradient (a hidden layer's training step)."""

    def forward() -> None:
        with torch.no_grad():
            layer(U)

    U_train = U.clone().requires_grad_(True)
    with torch.no_grad():
        gradient = torch.randn_like(layer(U))

    def train() -> None:
        layer.zero_grad(set_to_none=True)
        U_train.grad = None
        layer(U_train).backward(gradient)

    return forward, train


def run_benchmark(
    structures: Iterable[str] | None = None,
    sizes: Iterable[tuple[int, int]] = ((2048, 2048),),
    shares: Iterable[float] = (0.1,),
    batch_sizes: Iterable[int] = (256,),
    repeats: int = 15,
    options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchmarkResult]:
    """Time forward and forward+backward (float32) of each structure against ``nn.Linear``.

    Args:
        structures: names to time; all installed structures by default.
        sizes: ``(input_dim, output_dim)`` pairs.
        shares: ``nb_params_share`` values.
        batch_sizes: rows of the input.
        repeats: rounds per measurement (the medians are over these).
        options: structure options per structure name, e.g. ``{"sss": {"nb_states": 32}}``.
        progress: called with a line of text before each measurement.

    The number of threads is whatever ``torch.get_num_threads()`` is; set it before calling.
    """
    names = list(structures) if structures is not None else available()
    options = options or {}
    results = []
    for input_dim, output_dim in sizes:
        dense = nn.Linear(input_dim, output_dim)
        for batch_size in batch_sizes:
            U = torch.randn(batch_size, input_dim)
            dense_forward, dense_train = timed_steps(dense, U)
            for share in shares:
                for name in names:
                    if progress:
                        progress(
                            f"{name}: {output_dim} x {input_dim}, share {share:g}, batch {batch_size}"
                        )
                    layer = create(name, input_dim, output_dim, share, **options.get(name, {}))
                    forward, train = timed_steps(layer, U)
                    fwd, dense_fwd, fwd_ratio = time_against_dense(forward, dense_forward, repeats)
                    trn, dense_trn, trn_ratio = time_against_dense(train, dense_train, repeats)
                    results.append(
                        BenchmarkResult(
                            structure=name,
                            input_dim=input_dim,
                            output_dim=output_dim,
                            nb_params_share=share,
                            batch_size=batch_size,
                            nb_parameters=layer.get_nb_parameters(),
                            dense_nb_parameters=input_dim * output_dim + output_dim,
                            forward_ms=fwd * 1e3,
                            dense_forward_ms=dense_fwd * 1e3,
                            forward_ratio=fwd_ratio,
                            train_ms=trn * 1e3,
                            dense_train_ms=dense_trn * 1e3,
                            train_ratio=trn_ratio,
                        )
                    )
    return results


def format_table(results: Iterable[BenchmarkResult]) -> str:
    """A plain-text table of benchmark results, one row per measurement."""
    header = (
        f"{'structure':<10} {'out x in':>11} {'share':>6} {'batch':>6} {'params':>9} "
        f"{'fwd ms':>8} {'dense':>8} {'fwd ratio':>9} {'f+b ms':>8} {'dense':>8} {'f+b ratio':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.structure:<10} {f'{r.output_dim}x{r.input_dim}':>11} {r.nb_params_share:>6g} "
            f"{r.batch_size:>6} {r.nb_parameters:>9} {r.forward_ms:>8.3f} {r.dense_forward_ms:>8.3f} "
            f"{r.forward_ratio:>9.3f} {r.train_ms:>8.3f} {r.dense_train_ms:>8.3f} {r.train_ratio:>9.3f}"
        )
    return "\n".join(lines)
