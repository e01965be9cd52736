"""The demo: compress the hidden layer of a digit classifier with every installed structure.

A small MLP (64 -> 256 -> 256 -> 10) is trained on the handwritten digits shipped with the
package; its 256 x 256 middle layer is replaced by each installed structure, fitted to the
trained weights at a few shares with :func:`structurednets.compress`, and the whole model is
fine-tuned. With ``calibrate=True`` (``--calibrate``) each fit is calibrated on the training
digits: it minimises the hidden layer's output error on the inputs it sees there instead of
the weight error. Nothing is downloaded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from structurednets.approximation import format_error
from structurednets.compression import compress
from structurednets.datasets import load_digits
from structurednets.layers.layer_helpers import get_nb_model_parameters
from structurednets.registry import available, get_structure
from structurednets.training_helpers import train_with_decreasing_lr

__all__ = ["DEFAULT_SHARES", "DemoRow", "format_demo_table", "run_demo"]

HIDDEN = 256
#: Small shares, where the structures differ most.
DEFAULT_SHARES = (0.02, 0.05, 0.1)


@dataclass(frozen=True)
class DemoRow:
    """One structure at one share (``structure="dense"`` is the trained original).

    Attributes:
        nb_parameters: parameters of the hidden layer (bias included); ``None`` if skipped.
        model_nb_parameters: parameters of the whole model; ``None`` if skipped.
        relative_error: ``||W_structured - W||_F / ||W||_F`` right after fitting.
        accuracy_fitted: test accuracy with the fitted layer, before fine-tuning.
        accuracy_finetuned: test accuracy after fine-tuning the whole model.
        fit_seconds, finetune_seconds: wall-clock time of the two steps.
        skipped: why the structure was not used at this share (e.g. budget too small).
        output_relative_error: with calibration, the layer's output error on the training
            digits right after fitting; else ``None``.
    """

    structure: str
    nb_params_share: float
    nb_parameters: int | None
    model_nb_parameters: int | None
    relative_error: float | None
    accuracy_fitted: float | None
    accuracy_finetuned: float | None
    fit_seconds: float | None
    finetune_seconds: float | None
    skipped: str | None = None
    output_relative_error: float | None = None


@dataclass(frozen=True)
class DigitsSplit:
    """Standardised digits: 3/4 for training (of which 20% validate), 1/4 for testing."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def _split(seed: int) -> DigitsSplit:
    X, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(X))
    X, y = X[order], y[order]
    nb_test = len(X) // 4
    X_train, X_test = X[nb_test:], X[:nb_test]
    mean, std = X_train.mean(axis=0), X_train.std(axis=0) + 1e-3
    return DigitsSplit((X_train - mean) / std, y[nb_test:], (X_test - mean) / std, y[:nb_test])


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            input=nn.Linear(64, HIDDEN),
            act1=nn.ReLU(),
            hidden=nn.Linear(HIDDEN, HIDDEN),
            act2=nn.ReLU(),
            output=nn.Linear(HIDDEN, 10),
        )
    )


def _accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(X)).argmax(dim=1).numpy()
    return float((predictions == y).mean())


def _train(model: nn.Module, data: DigitsSplit, epochs: int, seed: int) -> None:
    train_with_decreasing_lr(
        model,
        data.X_train,
        data.y_train,
        patience=4,
        batch_size=64,
        optimizer_class=torch.optim.Adam,
        initial_lr=1e-3,
        nb_lr_rounds=2,
        max_epochs_per_round=epochs,
        seed=seed,
    )


def run_demo(
    structures: Iterable[str] | None = None,
    shares: Iterable[float] = DEFAULT_SHARES,
    epochs: int = 30,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    calibrate: bool = False,
) -> list[DemoRow]:
    """Train the MLP, then compress, fit and fine-tune each structure at each share.

    With ``calibrate``, the fits are calibrated on the training digits (batches of 256).
    Returns the dense row first, then one row per structure and share (in that order).
    """
    say = progress or (lambda line: None)
    names = list(structures) if structures is not None else available()
    names = list(dict.fromkeys(get_structure(name).name for name in names))
    shares = list(shares)
    torch.manual_seed(seed)
    data = _split(seed)
    model = _mlp()
    say(
        f"training a 64-{HIDDEN}-{HIDDEN}-10 MLP on {len(data.X_train)} digits "
        f"({len(data.X_test)} more for testing) ..."
    )
    start = time.perf_counter()
    _train(model, data, epochs, seed)
    dense_accuracy = _accuracy(model, data.X_test, data.y_test)
    say(f"dense: test accuracy {dense_accuracy:.3f} ({time.perf_counter() - start:.1f} s)")
    rows = [
        DemoRow(
            structure="dense",
            nb_params_share=1.0,
            nb_parameters=get_nb_model_parameters(model.hidden),
            model_nb_parameters=get_nb_model_parameters(model),
            relative_error=0.0,
            accuracy_fitted=dense_accuracy,
            accuracy_finetuned=dense_accuracy,
            fit_seconds=0.0,
            finetune_seconds=time.perf_counter() - start,
        )
    ]
    total = len(names) * len(shares)
    for index, (name, share) in enumerate(
        ((name, share) for name in names for share in shares), start=1
    ):
        head = f"[{index}/{total}] {name} at share {share:g}:"
        calibration = None
        if calibrate:
            train = torch.from_numpy(data.X_train)
            calibration = list(torch.split(train, 256))
        # The demo compares what each structure keeps, so costlier layers (ldr) stay in.
        compressed, report = compress(
            model, name, share, include="hidden", calibration=calibration, max_cost_ratio=None
        )
        if report.skipped:
            (skipped,) = report.skipped
            say(f"{head} skipped, {skipped.reason}")
            rows.append(
                DemoRow(
                    structure=name,
                    nb_params_share=share,
                    nb_parameters=None,
                    model_nb_parameters=None,
                    relative_error=None,
                    accuracy_fitted=None,
                    accuracy_finetuned=None,
                    fit_seconds=None,
                    finetune_seconds=None,
                    skipped=skipped.reason,
                )
            )
            continue
        (layer,) = report.layers
        fitted_accuracy = _accuracy(compressed, data.X_test, data.y_test)
        output = ""
        if layer.output_relative_error is not None:
            output = f", output error {layer.output_relative_error:.3f}"
        say(
            f"{head} fitted in {layer.seconds:.2f} s, relative error {layer.relative_error:.3f}"
            f"{output}, test accuracy {fitted_accuracy:.3f}; fine-tuning ..."
        )
        start = time.perf_counter()
        _train(compressed, data, epochs, seed)
        finetune_seconds = time.perf_counter() - start
        tuned_accuracy = _accuracy(compressed, data.X_test, data.y_test)
        say(f"{head} fine-tuned in {finetune_seconds:.1f} s, test accuracy {tuned_accuracy:.3f}")
        rows.append(
            DemoRow(
                structure=name,
                nb_params_share=share,
                nb_parameters=layer.nb_parameters_after,
                model_nb_parameters=report.model_nb_parameters_after,
                relative_error=layer.relative_error,
                accuracy_fitted=fitted_accuracy,
                accuracy_finetuned=tuned_accuracy,
                fit_seconds=layer.seconds,
                finetune_seconds=finetune_seconds,
                output_relative_error=layer.output_relative_error,
            )
        )
    return rows


def _cell(value: float | int | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_demo_table(rows: Iterable[DemoRow]) -> str:
    """The demo's rows as a plain-text table; reasons for skipped rows follow it. An
    ``out error`` column follows ``rel. error`` when a row was calibrated."""
    rows = list(rows)
    calibrated = any(r.output_relative_error is not None for r in rows)
    output_header = f" {'out error':>10}" if calibrated else ""
    header = (
        f"{'structure':<10} {'share':>6} {'layer params':>12} {'model params':>12} "
        f"{'rel. error':>10}{output_header} {'acc fitted':>10} {'acc tuned':>9} {'fit s':>6} "
        f"{'tune s':>6}"
    )
    lines = [header, "-" * len(header)]
    notes = []
    for r in rows:
        error = f"{'-':>10}" if r.relative_error is None else format_error(r.relative_error)
        if calibrated:
            output = r.output_relative_error
            error += f" {'-':>10}" if output is None else f" {format_error(output)}"
        lines.append(
            f"{r.structure:<10} {r.nb_params_share:>6g} {_cell(r.nb_parameters, 'd', 12)} "
            f"{_cell(r.model_nb_parameters, 'd', 12)} {error} "
            f"{_cell(r.accuracy_fitted, '.3f', 10)} {_cell(r.accuracy_finetuned, '.3f', 9)} "
            f"{_cell(r.fit_seconds, '.2f', 6)} {_cell(r.finetune_seconds, '.1f', 6)}"
        )
        if r.skipped is not None:
            notes.append(f"{r.structure} at share {r.nb_params_share:g}: {r.skipped}")
    return "\n".join(lines + notes)
