"""Pictures of comparisons and demo results; matplotlib is an optional extra, imported lazily.

Figures are drawn on ``matplotlib.figure.Figure`` directly, without ``pyplot``, so that no
GUI backend is selected or changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from structurednets.comparison import ComparisonRow
    from structurednets.demo import DemoRow

__all__ = ["check_plot_path", "plot_comparison", "plot_demo", "require_matplotlib"]

#: Errors span orders of magnitude and are drawn on a log scale; exact fits (0) and errors
#: below float32 rounding are drawn at this floor.
ERROR_FLOOR = 1e-7
MISSING_MATPLOTLIB = "plotting needs matplotlib: pip install 'structurednets[plot]'"


def require_matplotlib() -> type[Figure]:
    """The ``Figure`` class, or ``ImportError`` saying how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(MISSING_MATPLOTLIB) from error
    return Figure


def check_plot_path(path: str | os.PathLike[str]) -> None:
    """Fail early (before long work) if a picture cannot be written to ``path``.

    Raises ``ImportError`` without matplotlib, ``ValueError`` for a file type matplotlib
    cannot write, ``FileNotFoundError`` for a missing folder.
    """
    figure_class = require_matplotlib()
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    supported = figure_class().canvas.get_supported_filetypes()
    if extension not in supported:
        raise ValueError(
            f"cannot write a picture to {path!r}: use one of the extensions "
            + ", ".join(f".{each}" for each in sorted(supported))
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: the folder {folder!r} does not exist")


def _by_structure(rows: Iterable, value: str) -> dict[str, tuple[list[float], list[float]]]:
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        y = getattr(row, value)
        if y is None:
            continue
        shares, values = lines.setdefault(row.structure, ([], []))
        shares.append(row.nb_params_share)
        values.append(y)
    return lines


def _share_axis(axes: object, rows: Iterable) -> None:
    """A log-scaled share axis labelled at the shares used (``0.05``, not ``5 x 10^-2``)."""
    shares = sorted({row.nb_params_share for row in rows})
    axes.set_xscale("log")
    axes.minorticks_off()
    axes.set_xticks(shares, [f"{share:g}" for share in shares])


def plot_comparison(rows: Sequence[ComparisonRow], path: str | os.PathLike[str]) -> None:
    """Relative error (log scale) against share, one line per structure; written to ``path``."""
    figure = require_matplotlib()(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.subplots()
    for structure, (shares, errors) in _by_structure(rows, "relative_error").items():
        shown = [max(error, ERROR_FLOOR) for error in errors]
        axes.plot(shares, shown, marker="o", label=structure)
    if rows:
        axes.set_title(f"approximating a {rows[0].output_dim} x {rows[0].input_dim} matrix")
    _share_axis(axes, rows)
    axes.set_xlabel("nb_params_share (share of the dense weights)")
    axes.set_ylabel(f"relative Frobenius error (below {ERROR_FLOOR:g} drawn at {ERROR_FLOOR:g})")
    axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)


def plot_demo(rows: Sequence[DemoRow], path: str | os.PathLike[str]) -> None:
    """Test accuracy against share, before and after fine-tuning; written to ``path``."""
    figure = require_matplotlib()(figsize=(9.6, 4.4), layout="constrained")
    before, after = figure.subplots(1, 2, sharey=True)
    dense = [row for row in rows if row.structure == "dense"]
    compressed = [row for row in rows if row.structure != "dense"]
    for axes, value, title in (
        (before, "accuracy_fitted", "fitted to the trained layer"),
        (after, "accuracy_finetuned", "after fine-tuning"),
    ):
        for structure, (shares, accuracies) in _by_structure(compressed, value).items():
            axes.plot(shares, accuracies, marker="o", label=structure)
        for row in dense:
            axes.axhline(row.accuracy_finetuned, color="black", linestyle="--", label="dense")
        axes.set_title(title)
        _share_axis(axes, compressed)
        axes.set_xlabel("nb_params_share of the hidden layer")
        axes.grid(True, alpha=0.3)
    before.set_ylabel("test accuracy")
    after.legend()
    figure.savefig(path, dpi=120)
