"""Compare the installed structures on one matrix: accuracy, size, fitting time and speed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from structurednets.approximation import (
    Approximation,
    NoStructureFitsError,
    SkippedStructure,
    approximate,
    as_weight_matrix,
    format_error,
)
from structurednets.benchmark import time_against_dense
from structurednets.calibration import as_input_statistics
from structurednets.cost import dense_cost
from structurednets.layers.structured_layer import StructuredLayer
from structurednets.registry import available, get_structure

__all__ = ["ComparisonRow", "compare_structures", "format_comparison_table"]


@dataclass(frozen=True)
class ComparisonRow:
    """One structure at one share, fitted to the compared matrix ``W`` (output_dim x input_dim).

    Attributes:
        structure, nb_params_share: what was fitted.
        output_dim, input_dim: the shape of ``W``.
        dense_nb_parameters: ``output_dim * input_dim``, the weights of ``nn.Linear``.
        relative_error: ``||W_structured - W||_F / ||W||_F``; ``None`` if skipped.
        nb_parameters: weight scalars of the structured layer; ``None`` if skipped.
        fit_seconds: wall-clock time of the fit; ``None`` if skipped.
        forward_ms, dense_forward_ms: median milliseconds of one forward pass (float32, no
            bias, ``batch_size`` rows) of the layer and of ``nn.Linear``; ``None`` if skipped
            or not timed.
        forward_ratio: median of the per-round ratios ``forward_ms / dense_forward_ms``
            (below 1: faster than ``nn.Linear``).
        forward_cost_ratio: the forward multiply-adds the layer's layout promises at
            ``batch_size`` against ``nn.Linear``'s (``layer.cost``), to set beside
            ``forward_ratio``.
        batch_size: rows of the timed input.
        skipped: why no layer was built (budget too small, or the fit failed); else ``None``.
        output_relative_error: with ``inputs``, ``||(W - W~) X^T||_F / ||W X^T||_F`` of the
            calibrated fit; else ``None``.
    """

    structure: str
    nb_params_share: float
    output_dim: int
    input_dim: int
    dense_nb_parameters: int
    relative_error: float | None
    nb_parameters: int | None
    fit_seconds: float | None
    forward_ms: float | None
    dense_forward_ms: float | None
    forward_ratio: float | None
    batch_size: int
    skipped: str | None = None
    output_relative_error: float | None = None
    forward_cost_ratio: float | None = None


def _time_forward(
    layer: nn.Module, input_dim: int, output_dim: int, batch_size: int, repeats: int
) -> tuple[float, float, float]:
    """Median forward seconds of ``layer`` and of ``nn.Linear``, and the median ratio."""
    layer = layer.to(dtype=torch.float32)
    dense = nn.Linear(input_dim, output_dim, bias=False)
    U = torch.randn(batch_size, input_dim)

    def forward() -> None:
        with torch.no_grad():
            layer(U)

    def dense_forward() -> None:
        with torch.no_grad():
            dense(U)

    return time_against_dense(forward, dense_forward, repeats)


def compare_structures(
    matrix: object,
    shares: Iterable[float],
    structures: Iterable[str] | None = None,
    *,
    batch_size: int = 256,
    repeats: int = 15,
    time_forward: bool = True,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
    inputs: object = None,
) -> list[ComparisonRow]:
    """Fit every structure at every share to ``matrix``; one row each, by structure then share.

    Args:
        matrix: the ``(output_dim, input_dim)`` numpy array or tensor to approximate.
        shares: ``nb_params_share`` values, each in (0, 1].
        structures: names to compare; all installed structures by default.
        batch_size: rows of the input the forward pass is timed with.
        repeats: rounds per timing median.
        time_forward: time the forward pass against ``nn.Linear`` (slow part; off for tests).
        options: structure options per structure name, e.g. ``{"lowrank": {"rank": 8}}``.
        progress: called with a line of text per structure and share.
        inputs: ``(n_samples, input_dim)`` inputs of the layer: each fit is then calibrated
            (see :func:`structurednets.approximate`) and the rows report the output error.

    A structure whose budget is too small at a share, or whose fit fails, gets a row with
    ``skipped`` set. The fit is the same as :func:`structurednets.approximate`'s. Timings use
    ``torch.get_num_threads()`` threads; set it before calling.
    """
    target = as_weight_matrix(matrix)
    statistics = as_input_statistics(target.shape[1], inputs=inputs)
    names = list(structures) if structures is not None else available()
    if not names:
        raise ValueError("no structures installed; e.g. pip install structurednets-lowrank")
    names = list(dict.fromkeys(get_structure(name).name for name in names))
    shares = list(shares)
    if not shares:
        raise ValueError("shares must hold at least one nb_params_share")
    say = progress or (lambda line: None)
    rows: list[ComparisonRow] = []
    for share in shares:
        try:
            tried = approximate(
                target, names, share, structure_options=options, inputs=statistics
            ).tried
        except NoStructureFitsError as error:
            tried = error.skipped
        for each in tried:
            rows.append(_row(each, target, batch_size, repeats, time_forward))
            say(_progress_line(rows[-1]))
    order = {name: index for index, name in enumerate(names)}
    return sorted(rows, key=lambda row: (order[row.structure], shares.index(row.nb_params_share)))


def _row(
    result: Approximation | SkippedStructure,
    target: torch.Tensor,
    batch_size: int,
    repeats: int,
    time_forward: bool,
) -> ComparisonRow:
    output_dim, input_dim = target.shape
    common = {
        "structure": result.structure,
        "nb_params_share": result.nb_params_share,
        "output_dim": output_dim,
        "input_dim": input_dim,
        "dense_nb_parameters": output_dim * input_dim,
        "batch_size": batch_size,
    }
    if isinstance(result, SkippedStructure):
        return ComparisonRow(
            **common,
            relative_error=None,
            nb_parameters=None,
            fit_seconds=None,
            forward_ms=None,
            dense_forward_ms=None,
            forward_ratio=None,
            skipped=result.reason,
        )
    forward = dense_forward = ratio = None
    if time_forward:
        seconds, dense_seconds, ratio = _time_forward(
            result.layer, input_dim, output_dim, batch_size, repeats
        )
        forward, dense_forward = seconds * 1e3, dense_seconds * 1e3
    return ComparisonRow(
        **common,
        relative_error=result.relative_error,
        nb_parameters=result.nb_parameters,
        fit_seconds=result.seconds,
        forward_ms=forward,
        dense_forward_ms=dense_forward,
        forward_ratio=ratio,
        output_relative_error=result.output_relative_error,
        forward_cost_ratio=_forward_cost_ratio(result.layer, batch_size),
    )


def _forward_cost_ratio(layer: StructuredLayer, batch_size: int) -> float | None:
    """The forward multiply-adds the layer's layout promises, against ``nn.Linear``'s."""
    try:
        cost = layer.cost(batch_size)
    except NotImplementedError:
        return None
    return cost.forward_ratio(dense_cost(layer.input_dim, layer.output_dim, batch_size))


def _progress_line(row: ComparisonRow) -> str:
    head = f"{row.structure} at share {row.nb_params_share:g}:"
    if row.skipped is not None:
        return f"{head} skipped, {row.skipped}"
    text = f"{head} relative error {row.relative_error:.4g}"
    if row.output_relative_error is not None:
        text += f", output error {row.output_relative_error:.4g}"
    text += f", fit {row.fit_seconds:.2f} s"
    if row.forward_ratio is not None:
        text += f", forward {row.forward_ratio:.3f} x nn.Linear"
    return text


def _number(value: float | int | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def _error(value: float | None) -> str:
    return f"{'-':>10}" if value is None else format_error(value)


def format_comparison_table(rows: Iterable[ComparisonRow]) -> str:
    """The rows as a plain-text table; skipped rows show ``-`` and their reasons follow.

    The timing columns are left out when no row was timed, the output error column when no
    row was calibrated."""
    rows = list(rows)
    timed = any(row.forward_ratio is not None for row in rows)
    costed = any(row.forward_cost_ratio is not None for row in rows)
    calibrated = any(row.output_relative_error is not None for row in rows)
    header = f"{'structure':<10} {'share':>6} {'params':>9} {'rel. error':>10}"
    if calibrated:
        header += f" {'out error':>10}"
    header += f" {'fit s':>7}"
    if timed:
        header += f" {'fwd ms':>8} {'dense ms':>8} {'fwd ratio':>9}"
    if costed:
        header += f" {'fwd cost':>8}"
    lines = [header, "-" * len(header)]
    notes = []
    for row in rows:
        line = (
            f"{row.structure:<10} {row.nb_params_share:>6g} {_number(row.nb_parameters, 'd', 9)} "
            f"{_error(row.relative_error)}"
        )
        if calibrated:
            line += f" {_error(row.output_relative_error)}"
        line += f" {_number(row.fit_seconds, '.3f', 7)}"
        if timed:
            line += (
                f" {_number(row.forward_ms, '.3f', 8)} {_number(row.dense_forward_ms, '.3f', 8)} "
                f"{_number(row.forward_ratio, '.3f', 9)}"
            )
        if costed:
            line += f" {_number(row.forward_cost_ratio, '.3f', 8)}"
        lines.append(line)
        if row.skipped is not None:
            notes.append(f"{row.structure} at share {row.nb_params_share:g}: {row.skipped}")
    return "\n".join(lines + notes)
