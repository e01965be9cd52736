"""Training with early stopping and a learning rate that halves, restoring the best model.

Also :func:`param_groups`, the optimiser parameter groups that give each structured layer's
parameters the learning-rate multipliers the layer asks for (see :func:`param_groups`).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEFAULT_LEARNING_RATES",
    "TrainingResult",
    "default_learning_rate",
    "param_groups",
    "train_with_decreasing_lr",
]

#: Learning rates :func:`train_with_decreasing_lr` starts from when no ``initial_lr`` is given,
#: for optimisers whose own default does not suit it. Plain SGD starts from 0.5 (its own
#: 1e-3 is far too slow without momentum; 1.0 killed every ReLU of a digit classifier with an
#: ldr hidden layer in two steps, without a loss that rose); every other optimiser starts from
#: the default of its own ``lr`` argument (Adam, AdamW, NAdam, RAdam: 1e-3; RMSprop: 1e-2).
DEFAULT_LEARNING_RATES: dict[type, float] = {torch.optim.SGD: 0.5}


def default_learning_rate(optimizer_class: Callable[..., torch.optim.Optimizer]) -> float:
    """The learning rate to start from with ``optimizer_class``: its entry in
    :data:`DEFAULT_LEARNING_RATES` (subclasses included), else the default of its ``lr``
    argument. Raises ``ValueError`` when neither exists (pass ``initial_lr`` then)."""
    for cls in getattr(optimizer_class, "__mro__", ()):
        if cls in DEFAULT_LEARNING_RATES:
            return DEFAULT_LEARNING_RATES[cls]
    try:
        default = inspect.signature(optimizer_class).parameters["lr"].default
    except (KeyError, TypeError, ValueError):
        default = inspect.Parameter.empty
    if isinstance(default, torch.Tensor):
        default = float(default)
    if isinstance(default, bool) or not isinstance(default, (int, float)) or not default > 0:
        raise ValueError(
            f"optimizer_class {getattr(optimizer_class, '__name__', optimizer_class)!r} has no "
            "default learning rate to start from; pass initial_lr"
        )
    return float(default)


def param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Optimiser parameter groups with per-parameter learning rates, ``lr`` times a multiplier.

    A module (typically a :class:`~structurednets.StructuredLayer`) asks for multipliers by
    defining ``lr_multipliers(self) -> dict[str, float]``, mapping the names of its own
    parameters (as in ``module.named_parameters()``) to factors; parameters it
    does not name, and those of modules without the method, get ``lr`` itself. A plugin
    overrides the method where its factors need other step sizes than a dense weight (e.g.
    the factors of a product, or an operator against its generators)::

        optimizer = torch.optim.Adam(structurednets.param_groups(model, 1e-3))

    Returns one group per distinct learning rate (``{"params": [...], "lr": ...}``), in
    order of first appearance; every trainable parameter is in exactly one group.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    multipliers: dict[int, float] = {}
    for module_name, module in model.named_modules():
        hook = getattr(module, "lr_multipliers", None)
        if not callable(hook):
            continue
        own = dict(module.named_parameters())
        for name, factor in hook().items():
            if name not in own:
                raise ValueError(
                    f"{type(module).__name__}.lr_multipliers() names {name!r}, which is not "
                    f"a parameter of module {module_name or 'model'!r} (it has {sorted(own)})"
                )
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise ValueError(
                    f"{type(module).__name__}.lr_multipliers() gives {name!r} the factor "
                    f"{factor!r}; expected a positive number"
                )
            multipliers[id(own[name])] = float(factor)
    groups: dict[float, list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            rate = lr * multipliers.get(id(parameter), 1.0)
            groups.setdefault(rate, []).append(parameter)
    return [{"params": params, "lr": rate} for rate, params in groups.items()]


@dataclass
class TrainingResult:
    """What :func:`train_with_decreasing_lr` returns.

    The histories have one entry per epoch, over all learning-rate rounds, starting with the
    model as it was before training (``lr_history[0]`` is then ``0.0``). Accuracies are
    ``None`` for regression targets (floating-point ``y``).

    Attributes:
        model: the trained model with the weights of the best validation loss restored
            (the same object that was passed in).
        best_val_loss: the validation loss of those weights.
        best_val_accuracy: their validation accuracy, or ``None`` for regression.
        diverged: whether some round diverged (a non-finite loss) or collapsed (a training
            loss that rose far above the round's start) and was rolled back.
        initial_lr: the learning rate of the first round (given, or the optimiser's default).
    """

    model: nn.Module
    best_val_loss: float
    best_val_accuracy: float | None
    train_loss_history: list[float] = field(default_factory=list)
    train_accuracy_history: list[float] | None = None
    val_loss_history: list[float] = field(default_factory=list)
    val_accuracy_history: list[float] | None = None
    lr_history: list[float] = field(default_factory=list)
    diverged: bool = False
    initial_lr: float = 0.0

    @property
    def nb_epochs(self) -> int:
        """Epochs trained (the initial evaluation not counted)."""
        return len(self.lr_history) - 1


def _as_tensor(name: str, value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")


def _prepare(
    X: object, y: object, x_name: str, y_name: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    X_t, y_t = _as_tensor(x_name, X), _as_tensor(y_name, y)
    if X_t.dim() == 0 or len(X_t) == 0:
        raise ValueError(f"{x_name} must hold at least one sample, got shape {tuple(X_t.shape)}")
    if len(X_t) != len(y_t):
        raise ValueError(
            f"{x_name} and {y_name} must have the same number of samples, "
            f"got {len(X_t)} and {len(y_t)}"
        )
    X_t = X_t.to(dtype)
    if y_t.is_floating_point():
        y_t = y_t.to(dtype)
    elif y_t.dtype != torch.bool:
        y_t = y_t.long()
    else:
        raise TypeError(f"{y_name} must hold class indices or real targets, got dtype bool")
    return X_t, y_t


class _Evaluator:
    """Loss and accuracy of a model on a data set, in batches, without gradients."""

    def __init__(self, loss_function: Callable, batch_size: int, device: torch.device):
        self.loss_function = loss_function
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, X: torch.Tensor, y: torch.Tensor
    ) -> tuple[float, float | None]:
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        try:
            for start in range(0, len(X), self.batch_size):
                X_batch = X[start : start + self.batch_size].to(self.device)
                y_batch = y[start : start + self.batch_size].to(self.device)
                output = model(X_batch)
                total_loss += float(self.loss_function(output, y_batch)) * len(X_batch)
                if not y.is_floating_point():
                    correct += int((output.argmax(dim=-1) == y_batch).sum())
        finally:
            model.train(was_training)
        accuracy = None if y.is_floating_point() else correct / len(X)
        return total_loss / len(X), accuracy


def _format(loss: float, accuracy: float | None) -> str:
    text = f"loss {loss:.4g}"
    return text if accuracy is None else f"{text}, acc {accuracy:.4f}"


def train_with_decreasing_lr(
    model: nn.Module,
    X_train: Any,
    y_train: Any,
    X_val: Any = None,
    y_val: Any = None,
    patience: int = 10,
    batch_size: int = 1000,
    verbose: bool = False,
    loss_function_class: Callable[[], Callable] = torch.nn.CrossEntropyLoss,
    min_patience_improvement: float = 1e-10,
    optimizer_class: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    use_gpu: bool = False,
    *,
    initial_lr: float | None = None,
    nb_lr_rounds: int = 10,
    max_epochs_per_round: int | None = None,
    seed: int | None = None,
    collapse_tolerance: float = 0.2,
) -> TrainingResult:
    """Train ``model`` in rounds of early-stopped epochs, halving the learning rate each round.

    Each round trains with a fresh ``optimizer_class(param_groups(model, lr), lr=lr)`` until
    the validation loss has not improved by more than ``min_patience_improvement`` for
    ``patience`` epochs, then restores the best weights seen so far (the untrained model is
    the first candidate) and halves ``lr``.

    A round that diverges (a non-finite loss) or collapses is stopped at once, rolled back to
    the best weights with a ``RuntimeWarning``, and training goes on at half the rate. A
    round collapses when an epoch ends with a training loss more than ``collapse_tolerance``
    times the untrained model's training loss above the one the round started from: too large
    a rate (e.g. Adam at 1.0) sends the loss from 2.3 to 50 in one epoch and leaves dead ReLUs
    that a later recovery to chance level would hide; so does a single batch whose loss
    rises five times as far (a blow-up within an epoch of few steps). (The validation loss
    may rise in a round that overfits; the training loss of a round that works does not.)

    Args:
        model: the module to train, in place, on the device of its parameters.
        X_train, y_train: numpy arrays or tensors; ``y`` holds class indices (integer dtype,
            accuracy is reported) or real targets (floating dtype, e.g. with ``MSELoss``).
        X_val, y_val: validation data; if either is missing, 20% of the training data are
            held out at random for validation.
        patience: epochs without improvement before a round ends.
        batch_size: samples per optimisation step and per evaluation batch.
        verbose: print a line per epoch and per round.
        loss_function_class: called without arguments to build the loss.
        min_patience_improvement: how much the validation loss must fall to count as better.
        optimizer_class: called as ``optimizer_class(param_groups, lr=lr)``; any
            ``torch.optim`` optimiser (or a ``functools.partial`` of one).
        use_gpu: move the model to CUDA first (raises if CUDA is not available).
        initial_lr: learning rate of the first round; by default
            :func:`default_learning_rate` of ``optimizer_class`` (SGD: 0.5, Adam: 1e-3).
        nb_lr_rounds: number of rounds (the learning rate of round k is ``initial_lr / 2**k``).
        max_epochs_per_round: stop a round after this many epochs even if it still improves.
        seed: seed for the validation split and the shuffling, for reproducible runs.
        collapse_tolerance: how far (in units of the untrained model's training loss) the
            training loss may rise above the round's start before the round counts as
            collapsed; ``math.inf`` turns the rule off.

    Returns:
        A :class:`TrainingResult` with the model (best weights restored) and the histories.
    """
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu=True but CUDA is not available; pass use_gpu=False")
        model.to("cuda")
    for name, value in (
        ("patience", patience),
        ("batch_size", batch_size),
        ("nb_lr_rounds", nb_lr_rounds),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    lr = default_learning_rate(optimizer_class) if initial_lr is None else initial_lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"initial_lr must be a positive number, got {initial_lr!r}")
    if not (isinstance(collapse_tolerance, (int, float)) and collapse_tolerance > 0):
        raise ValueError(
            f"collapse_tolerance must be a positive number, got {collapse_tolerance!r}"
        )
    reference = next(model.parameters(), None)
    if reference is None:
        raise ValueError("model has no parameters to train")
    device, dtype = reference.device, reference.dtype
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))

    X_train_t, y_train_t = _prepare(X_train, y_train, "X_train", "y_train", dtype)
    if X_val is None or y_val is None:
        if len(X_train_t) < 2:
            raise ValueError("need at least 2 training samples to hold out a validation set")
        order = torch.randperm(len(X_train_t), generator=generator)
        nb_val = max(1, round(0.2 * len(X_train_t)))
        X_val_t, y_val_t = X_train_t[order[:nb_val]], y_train_t[order[:nb_val]]
        X_train_t, y_train_t = X_train_t[order[nb_val:]], y_train_t[order[nb_val:]]
    else:
        X_val_t, y_val_t = _prepare(X_val, y_val, "X_val", "y_val", dtype)

    loss_function = loss_function_class()
    evaluate = _Evaluator(loss_function, batch_size, device)
    train_loss, train_acc = evaluate(model, X_train_t, y_train_t)
    val_loss, val_acc = evaluate(model, X_val_t, y_val_t)
    classification = val_acc is not None
    result = TrainingResult(
        model=model,
        best_val_loss=val_loss if math.isfinite(val_loss) else math.inf,
        best_val_accuracy=val_acc,
        train_loss_history=[train_loss],
        train_accuracy_history=[train_acc] if classification else None,
        val_loss_history=[val_loss],
        val_accuracy_history=[val_acc] if classification else None,
        lr_history=[0.0],
    )
    best_state = copy.deepcopy(model.state_dict())
    if verbose:
        print(f"start: train {_format(train_loss, train_acc)} | val {_format(val_loss, val_acc)}")

    result.initial_lr = lr = float(lr)
    # The loss scale a collapse is measured in: the untrained model's (off if not finite).
    scale_train = train_loss if math.isfinite(train_loss) else math.inf
    best_train_loss = train_loss
    for round_index in range(nb_lr_rounds):
        optimizer = optimizer_class(param_groups(model, lr), lr=lr)
        train_limit = best_train_loss + collapse_tolerance * scale_train
        round_val_losses: list[float] = []
        epoch = 0
        while max_epochs_per_round is None or epoch < max_epochs_per_round:
            epoch += 1
            worst_batch = _train_one_epoch(
                model,
                optimizer,
                loss_function,
                X_train_t,
                y_train_t,
                batch_size,
                device,
                generator,
                best_train_loss + 5 * collapse_tolerance * scale_train,
            )
            train_loss, train_acc = evaluate(model, X_train_t, y_train_t)
            val_loss, val_acc = evaluate(model, X_val_t, y_val_t)
            result.lr_history.append(lr)
            result.train_loss_history.append(train_loss)
            result.val_loss_history.append(val_loss)
            if classification:
                result.train_accuracy_history.append(train_acc)
                result.val_accuracy_history.append(val_acc)
            if verbose:
                print(
                    f"round {round_index + 1}/{nb_lr_rounds} (lr {lr:g}) epoch {epoch}: "
                    f"train {_format(train_loss, train_acc)} | val {_format(val_loss, val_acc)}"
                )
            if not math.isfinite(worst_batch) or not math.isfinite(val_loss):
                what = "a non-finite loss"
            elif worst_batch > best_train_loss + 5 * collapse_tolerance * scale_train:
                what = (
                    f"collapse: a batch's training loss reached {worst_batch:.4g}, from "
                    f"{best_train_loss:.4g} at the start of the round"
                )
            elif train_loss > train_limit:
                what = (
                    f"collapse: training loss {train_loss:.4g}, up from {best_train_loss:.4g} "
                    "at the start of the round"
                )
            else:
                what = ""
            if what:
                result.diverged = True
                warnings.warn(
                    f"training diverged ({what}) at lr={lr:g}; restored the best model seen "
                    f"(validation loss {result.best_val_loss:.4g}) and halving the rate",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            if val_loss < result.best_val_loss:
                result.best_val_loss, result.best_val_accuracy = val_loss, val_acc
                best_train_loss = train_loss
                best_state = copy.deepcopy(model.state_dict())
            round_val_losses.append(val_loss)
            if len(round_val_losses) > patience:
                recent = min(round_val_losses[-patience:])
                before = min(round_val_losses[:-patience])
                if recent >= before - min_patience_improvement:
                    break
        model.load_state_dict(best_state)
        lr *= 0.5
    if verbose:
        print(f"best: val {_format(result.best_val_loss, result.best_val_accuracy)}")
    return result


def _train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_function: Callable,
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    batch_limit: float,
) -> float:
    """One pass over shuffled batches; returns the largest batch loss, and stops early at a
    non-finite one or one above ``batch_limit``."""
    model.train()
    order = torch.randperm(len(X), generator=generator)
    worst = -math.inf
    for start in range(0, len(X), batch_size):
        index = order[start : start + batch_size]
        X_batch, y_batch = X[index].to(device), y[index].to(device)
        loss = loss_function(model(X_batch), y_batch)
        value = loss.item()
        if not math.isfinite(value):
            return math.nan
        worst = max(worst, value)
        if value > batch_limit:
            return worst
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return worst
