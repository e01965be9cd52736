"""The demo: compress the hidden layer of a digit classifier with every installed structure.

A small MLP (64 -> 256 -> 256 -> 10) is trained on the handwritten digits shipped with the
package; its 256 x 256 middle layer is replaced by each installed structure, fitted to the
trained weights at a few shares, and fine-tuned. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from structurednets.datasets import load_digits
from structurednets.layers.layer_helpers import get_nb_model_parameters
from structurednets.registry import available, create
from structurednets.training_helpers import train_with_decreasing_lr
from structurednets.validation import BudgetTooSmallError

__all__ = ["DemoRow", "format_demo_table", "run_demo"]

HIDDEN = 256


@dataclass(frozen=True)
class DemoRow:
    """One structure at one share (``structure="dense"`` is the trained original).

    Attributes:
        nb_parameters: parameters of the compressed layer (bias included).
        relative_error: ``||W_structured - W|| / ||W||`` (Frobenius) right after fitting.
        accuracy_fitted: test accuracy with the fitted layer, before fine-tuning.
        accuracy_finetuned: test accuracy after fine-tuning the whole model.
        fit_seconds, finetune_seconds: wall-clock time of the two steps.
    """

    structure: str
    nb_params_share: float
    nb_parameters: int
    relative_error: float
    accuracy_fitted: float
    accuracy_finetuned: float
    fit_seconds: float
    finetune_seconds: float


def _split(seed: int) -> tuple[np.ndarray, ...]:
    X, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(X))
    X, y = X[order], y[order]
    nb_test = len(X) // 4
    X_train, X_test = X[nb_test:], X[:nb_test]
    mean, std = X_train.mean(axis=0), X_train.std(axis=0) + 1e-3
    return (X_train - mean) / std, y[nb_test:], (X_test - mean) / std, y[:nb_test]


def _accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(X)).argmax(dim=1).numpy()
    return float((predictions == y).mean())


def _train(model: nn.Module, X: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    train_with_decreasing_lr(
        model,
        X,
        y,
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
    shares: Iterable[float] = (0.1, 0.25),
    epochs: int = 30,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[DemoRow]:
    """Train the MLP, then fit and fine-tune each structure at each share; one row each."""
    say = progress or (lambda line: None)
    torch.manual_seed(seed)
    X_train, y_train, X_test, y_test = _split(seed)
    model = nn.Sequential(
        nn.Linear(64, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )
    say(f"training a 64-{HIDDEN}-{HIDDEN}-10 MLP on {len(X_train)} digits ...")
    start = time.perf_counter()
    _train(model, X_train, y_train, epochs, seed)
    dense_accuracy = _accuracy(model, X_test, y_test)
    rows = [
        DemoRow(
            "dense",
            1.0,
            get_nb_model_parameters(model[2]),
            0.0,
            dense_accuracy,
            dense_accuracy,
            0.0,
            time.perf_counter() - start,
        )
    ]
    weight = model[2].weight.detach().double()
    bias = model[2].bias.detach()
    for name in structures if structures is not None else available():
        for share in shares:
            say(f"{name} at share {share:g}: fitting the {HIDDEN} x {HIDDEN} hidden layer ...")
            start = time.perf_counter()
            try:
                layer = create(
                    name, HIDDEN, HIDDEN, share, initial_weight_matrix=weight, initial_bias=bias
                )
            except BudgetTooSmallError as error:
                say(f"  skipped: {error}")
                continue
            fit_seconds = time.perf_counter() - start
            with torch.no_grad():
                error = float(
                    torch.linalg.norm(layer.to_dense().double() - weight)
                    / torch.linalg.norm(weight)
                )
            compressed = copy.deepcopy(model)
            compressed[2] = layer
            fitted_accuracy = _accuracy(compressed, X_test, y_test)
            say(
                f"  relative error {error:.3f}, test accuracy {fitted_accuracy:.3f}; fine-tuning ..."
            )
            start = time.perf_counter()
            _train(compressed, X_train, y_train, epochs, seed)
            rows.append(
                DemoRow(
                    name,
                    share,
                    layer.get_nb_parameters(),
                    error,
                    fitted_accuracy,
                    _accuracy(compressed, X_test, y_test),
                    fit_seconds,
                    time.perf_counter() - start,
                )
            )
    return rows


def format_demo_table(rows: Iterable[DemoRow]) -> str:
    """The demo's rows as a plain-text table."""
    header = (
        f"{'structure':<10} {'share':>6} {'params':>7} {'rel. error':>10} "
        f"{'acc fitted':>10} {'acc tuned':>9} {'fit s':>6} {'tune s':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.structure:<10} {r.nb_params_share:>6g} {r.nb_parameters:>7} {r.relative_error:>10.4f} "
            f"{r.accuracy_fitted:>10.3f} {r.accuracy_finetuned:>9.3f} {r.fit_seconds:>6.2f} "
            f"{r.finetune_seconds:>6.1f}"
        )
    return "\n".join(lines)
