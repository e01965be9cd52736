"""Checks of how a random layer trains from scratch: its output scale and its step size.

Both compare a structure with ``nn.Linear`` of the same shape, on a few shapes and shares
(those the structure's budget allows), so that a model whose dense layers are swapped for
structured ones keeps its activations' scale and its learning rate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from structurednets.datasets import load_digits
from structurednets.testing.case import ConformanceCase
from structurednets.training_helpers import param_groups, train_with_decreasing_lr
from structurednets.validation import BudgetTooSmallError

__all__ = [
    "OUTPUT_VARIANCE_TOLERANCE",
    "SCALING_SHAPES",
    "SCALING_SHARES",
    "UPDATE_SCALE_TOLERANCE",
    "check_output_variance",
    "check_trains_from_scratch",
    "check_update_scale",
    "relative_update",
]

#: ``(input_dim, output_dim)`` of the layers both checks build.
SCALING_SHAPES = ((64, 48), (160, 128))
#: Their shares (each skipped where the structure's budget is too small).
SCALING_SHARES = (0.1, 0.25, 0.5)
#: A random layer's mean output variance on unit-variance inputs is within this factor of
#: ``nn.Linear``'s (``1/3`` for its U(-1/sqrt(in), 1/sqrt(in)) weights).
OUTPUT_VARIANCE_TOLERANCE = 1.5
#: One Adam step changes the outputs by a relative amount within this factor of what the
#: same step changes in ``nn.Linear`` of the same shape.
UPDATE_SCALE_TOLERANCE = 4.0
_BATCH = 256
_LEARNING_RATE = 1e-3


def _layers(case: ConformanceCase, seeds: range):
    """``(shape, share, [layers])`` for each shape and share that builds (float32, no bias)."""
    for input_dim, output_dim in SCALING_SHAPES:
        for share in SCALING_SHARES:
            try:
                layers = [
                    case.build(
                        input_dim, output_dim, share, seed=seed, dtype=torch.float32, use_bias=False
                    )
                    for seed in seeds
                ]
            except BudgetTooSmallError:
                continue
            yield (input_dim, output_dim), share, layers


def _data(input_dim: int, output_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + seed)
    X = torch.randn(_BATCH, input_dim, generator=generator)
    return X, torch.randn(_BATCH, output_dim, generator=generator)


def relative_update(layer: nn.Module, X: torch.Tensor, G: torch.Tensor, lr: float) -> float:
    """``||layer(X) - layer'(X)|| / ||layer(X)||`` after one Adam step of ``lr`` (through
    :func:`structurednets.param_groups`) on the loss ``mean(layer(X) * G)``; changes the layer.

    ``X``: ``(batch, input_dim)``; ``G``: ``(batch, output_dim)``, the fixed output gradient
    direction (a loss linear in the outputs, so every structure sees the same signal).
    """
    optimizer = torch.optim.Adam(param_groups(layer, lr), lr=lr)
    before = layer(X)
    optimizer.zero_grad()
    (before * G).mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = layer(X)
    before = before.detach()
    return float((after - before).norm() / before.norm())


def check_output_variance(case: ConformanceCase) -> None:
    """A random layer's output variance on unit-variance inputs matches ``nn.Linear``'s
    (``input_dim * std**2 = 1/3``) within :data:`OUTPUT_VARIANCE_TOLERANCE`, on every shape
    and share of the grid that the budget allows (mean over 4 seeds)."""
    checked = 0
    for (input_dim, output_dim), share, layers in _layers(case, range(4)):
        variances = []
        for seed, layer in enumerate(layers):
            X, _ = _data(input_dim, output_dim, seed)
            with torch.no_grad():
                variances.append(float(layer(X).pow(2).mean()))
        ratio = sum(variances) / len(variances) / (1.0 / 3.0)
        assert 1 / OUTPUT_VARIANCE_TOLERANCE <= ratio <= OUTPUT_VARIANCE_TOLERANCE, (
            f"{input_dim}x{output_dim} at share {share}: a random layer's output variance is "
            f"{ratio:.3g} times nn.Linear's (allowed: within a factor "
            f"{OUTPUT_VARIANCE_TOLERANCE:g}); scale the random initialisation"
        )
        checked += 1
    assert checked, f"no layer of shapes {SCALING_SHAPES} at shares {SCALING_SHARES} builds"


def check_update_scale(case: ConformanceCase) -> None:
    """One Adam step at lr 1e-3 (with the layer's learning-rate multipliers, see
    :func:`structurednets.param_groups`) changes a random layer's outputs by a relative
    amount within :data:`UPDATE_SCALE_TOLERANCE` of ``nn.Linear``'s on the same data, on
    every shape and share of the grid that the budget allows (mean over 2 seeds): a
    coordinate check in the spirit of muP, so that one learning rate suits every structure."""
    checked = 0
    for (input_dim, output_dim), share, layers in _layers(case, range(2)):
        ratios = []
        for seed, layer in enumerate(layers):
            X, G = _data(input_dim, output_dim, seed)
            torch.manual_seed(seed)
            dense = nn.Linear(input_dim, output_dim, bias=False)
            structured = relative_update(layer, X, G, _LEARNING_RATE)
            assert math.isfinite(structured), f"{input_dim}x{output_dim}: non-finite step"
            ratios.append(structured / relative_update(dense, X, G, _LEARNING_RATE))
        ratio = sum(ratios) / len(ratios)
        assert 1 / UPDATE_SCALE_TOLERANCE <= ratio <= UPDATE_SCALE_TOLERANCE, (
            f"{input_dim}x{output_dim} at share {share}: one Adam step changes the outputs "
            f"{ratio:.3g} times as much as in nn.Linear (allowed: within a factor "
            f"{UPDATE_SCALE_TOLERANCE:g}); give the parameters learning-rate multipliers "
            "(lr_multipliers) or rescale them"
        )
        checked += 1
    assert checked, f"no layer of shapes {SCALING_SHAPES} at shares {SCALING_SHARES} builds"


def check_trains_from_scratch(case: ConformanceCase) -> None:
    """A digit classifier (600 digits, 64-64-64-10) whose hidden layer is a random layer of
    the structure (at the case's share, or 1.0 where that does not fit) reaches a validation
    accuracy of 0.8 with ``train_with_decreasing_lr`` and Adam at its default rate: the
    layer starts at the right scale and takes steps the optimiser's rate suits."""
    X, y = load_digits()
    X, y = X[:600], y[:600]
    X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-3)
    try:
        hidden = case.build(64, 64, seed=0, dtype=torch.float32)
    except BudgetTooSmallError:
        hidden = case.build(64, 64, 1.0, seed=0, dtype=torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), hidden, nn.ReLU(), nn.Linear(64, 10))
    result = train_with_decreasing_lr(
        model,
        X,
        y,
        patience=3,
        batch_size=64,
        optimizer_class=torch.optim.Adam,
        nb_lr_rounds=1,
        max_epochs_per_round=8,
        seed=0,
    )
    assert result.best_val_accuracy >= 0.8, (
        f"trained from scratch with Adam, the classifier reaches a validation accuracy of only "
        f"{result.best_val_accuracy:.3f} (nn.Linear: about 0.95); training losses "
        + ", ".join(f"{loss:.3g}" for loss in result.train_loss_history[:6])
    )
