import copy
import functools
import math
import warnings

import numpy as np
import pytest
import torch

from structurednets.testing import torch_threads
from structurednets.training_helpers import (
    TrainingResult,
    default_learning_rate,
    param_groups,
    train_with_decreasing_lr,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Small problems train fastest with one thread on a busy machine."""
    with torch_threads(1):
        yield


def separable_problem(nb_samples=600, nb_features=10, nb_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((nb_classes, nb_features)) * 4
    y = rng.integers(0, nb_classes, nb_samples)
    X = centres[y] + rng.standard_normal((nb_samples, nb_features))
    return X.astype(np.float32), y


def test_classifier_reaches_high_accuracy_from_numpy_arrays():
    X, y = separable_problem()
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 3)
    result = train_with_decreasing_lr(
        model,
        X,
        y,
        patience=3,
        batch_size=64,
        initial_lr=0.1,
        nb_lr_rounds=3,
        max_epochs_per_round=30,
        seed=0,
    )
    assert isinstance(result, TrainingResult)
    assert result.model is model
    assert result.best_val_accuracy >= 0.97
    assert result.val_accuracy_history[-1] <= 1.0
    assert len(result.train_loss_history) == len(result.val_loss_history) == result.nb_epochs + 1
    assert result.best_val_loss == min(result.val_loss_history)
    assert result.lr_history[1] == 0.1 and min(result.lr_history[1:]) == 0.025
    # the restored model is the best one: its validation loss is the best seen
    assert not result.diverged


def test_explicit_validation_data_and_tensors():
    X, y = separable_problem(seed=1)
    X_val, y_val = separable_problem(nb_samples=200, seed=1)
    model = torch.nn.Linear(10, 3)
    result = train_with_decreasing_lr(
        model,
        torch.from_numpy(X),
        torch.from_numpy(y),
        torch.from_numpy(X_val),
        y_val,
        patience=2,
        batch_size=100,
        initial_lr=0.1,
        nb_lr_rounds=2,
        max_epochs_per_round=10,
    )
    model.eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(X_val)), torch.from_numpy(y_val)
        )
    assert float(loss) == pytest.approx(result.best_val_loss, rel=1e-5)


def test_regression_with_mse():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((2, 5))
    X = rng.standard_normal((500, 5))
    y = X @ weight.T
    model = torch.nn.Linear(5, 2)
    result = train_with_decreasing_lr(
        model,
        X,
        y,
        patience=5,
        batch_size=50,
        loss_function_class=torch.nn.MSELoss,
        optimizer_class=torch.optim.Adam,
        initial_lr=0.05,
        nb_lr_rounds=4,
        max_epochs_per_round=100,
    )
    assert result.best_val_accuracy is None and result.val_accuracy_history is None
    assert result.best_val_loss < 1e-6
    np.testing.assert_allclose(model.weight.detach().numpy(), weight, atol=1e-3)


def test_divergence_restores_the_best_finite_model():
    X, y = separable_problem(seed=3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    with pytest.warns(RuntimeWarning, match="training diverged"):
        result = train_with_decreasing_lr(
            model,
            X * 1e3,
            y,
            patience=2,
            batch_size=32,
            initial_lr=1e6,
            nb_lr_rounds=2,
            max_epochs_per_round=5,
            seed=0,
        )
    assert result.diverged
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(result.best_val_loss)


def test_verbose_prints_progress(capsys):
    X, y = separable_problem(nb_samples=100)
    train_with_decreasing_lr(
        torch.nn.Linear(10, 3),
        X,
        y,
        patience=1,
        batch_size=50,
        verbose=True,
        initial_lr=0.1,
        nb_lr_rounds=1,
        max_epochs_per_round=2,
    )
    output = capsys.readouterr().out
    assert "start: train loss" in output and "round 1/1 (lr 0.1) epoch 2" in output


def test_bad_arguments():
    X, y = separable_problem(nb_samples=20)
    with pytest.raises(ValueError, match="same number of samples"):
        train_with_decreasing_lr(torch.nn.Linear(10, 3), X, y[:10])
    with pytest.raises(TypeError, match="X_train must be a numpy array or a torch tensor"):
        train_with_decreasing_lr(torch.nn.Linear(10, 3), X.tolist(), y)
    with pytest.raises(ValueError, match="patience must be a positive integer"):
        train_with_decreasing_lr(torch.nn.Linear(10, 3), X, y, patience=0)


def digits_mlp_problem(nb_samples=600, hidden=64):
    """A 64-hidden-hidden-10 digit classifier on standardised digits (a fast subset)."""
    from structurednets.datasets import load_digits

    X, y = load_digits()
    X, y = X[:nb_samples], y[:nb_samples]
    X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )
    return model, X, y


def test_adam_without_initial_lr_trains():
    """Adam with the positional signature of MatthiasKi/structurednets 1.0 and no initial_lr reaches high accuracy;
    a learning rate of 1.0 (the SGD default) sent the loss from 2.3 to over 50 in one epoch
    and ended at chance."""
    model, X, y = digits_mlp_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no collapse, no divergence
        result = train_with_decreasing_lr(
            model, X, y, None, None, 3, 64, False, torch.nn.CrossEntropyLoss, 1e-10,
            torch.optim.Adam,
            nb_lr_rounds=2, max_epochs_per_round=15, seed=0,
        )  # fmt: skip
    assert result.best_val_accuracy >= 0.9
    assert max(result.train_loss_history) <= result.train_loss_history[0] * 1.01
    assert result.lr_history[1] == pytest.approx(1e-3)
    assert result.initial_lr == pytest.approx(1e-3)
    assert not result.diverged


def test_default_learning_rates():
    assert default_learning_rate(torch.optim.SGD) == 0.5
    assert default_learning_rate(torch.optim.Adam) == 1e-3
    assert default_learning_rate(torch.optim.AdamW) == 1e-3
    assert default_learning_rate(torch.optim.RMSprop) == 1e-2
    assert default_learning_rate(functools.partial(torch.optim.Adam, betas=(0.8, 0.9))) == 1e-3

    class MySGD(torch.optim.SGD):
        pass

    assert default_learning_rate(MySGD) == 0.5
    with pytest.raises(ValueError, match="no default learning rate.*pass initial_lr"):
        default_learning_rate(lambda params, lr: torch.optim.SGD(params, lr=lr))
    with pytest.raises(ValueError, match="initial_lr must be a positive number, got -1"):
        train_with_decreasing_lr(torch.nn.Linear(10, 3), *separable_problem(20), initial_lr=-1)


def test_collapse_is_rolled_back_and_training_goes_on():
    """Adam at 1.0 collapses (the loss jumps far above its start, the ReLUs die): each such
    round is rolled back with a warning and the rate halved until one trains."""
    model, X, y = digits_mlp_problem()
    with pytest.warns(RuntimeWarning, match=r"training diverged \(collapse: "):
        result = train_with_decreasing_lr(
            model,
            X,
            y,
            patience=3,
            batch_size=64,
            optimizer_class=torch.optim.Adam,
            initial_lr=1.0,
            nb_lr_rounds=10,
            max_epochs_per_round=15,
            seed=0,
        )
    assert result.diverged
    assert result.best_val_accuracy >= 0.85
    assert result.best_val_loss == min(result.val_loss_history)


def test_untrained_model_is_a_candidate_best():
    """When every round collapses, the untrained model comes back, unchanged."""
    model, X, y = digits_mlp_problem(nb_samples=300)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning, match="training diverged"):
        result = train_with_decreasing_lr(
            model,
            X,
            y,
            batch_size=32,
            optimizer_class=torch.optim.Adam,
            initial_lr=10.0,
            nb_lr_rounds=2,
            max_epochs_per_round=5,
            seed=0,
        )
    assert result.best_val_loss == result.val_loss_history[0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


class Scaled(torch.nn.Module):
    """A product of two factors that asks for a smaller rate on one of them."""

    def __init__(self):
        super().__init__()
        self.left = torch.nn.Parameter(torch.ones(3, 2))
        self.right = torch.nn.Parameter(torch.ones(2, 4))

    def lr_multipliers(self):
        return {"left": 0.25}

    def forward(self, U):
        return U @ (self.left @ self.right).T


def test_param_groups_apply_multipliers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Scaled())
    groups = param_groups(model, 0.1)
    rates = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert rates[id(model[1].left)] == pytest.approx(0.025)
    assert rates[id(model[1].right)] == rates[id(model[0].weight)] == 0.1
    assert sorted(rates) == sorted(id(p) for p in model.parameters())
    # one SGD step moves `left` by a quarter of what a plain group would
    optimizer = torch.optim.SGD(groups, lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    grad = model[1].left.grad.clone()
    optimizer.step()
    torch.testing.assert_close(model[1].left.detach(), 1 - 0.025 * grad)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        param_groups(model, 0.0)

    class Wrong(Scaled):
        def lr_multipliers(self):
            return {"middle": 2.0}

    with pytest.raises(ValueError, match="names 'middle', which is not a parameter"):
        param_groups(Wrong(), 0.1)


def test_a_collapse_seen_only_after_the_epoch_is_rolled_back():
    """One batch per epoch: the batch loss is measured before the step, so only the
    evaluation after the epoch sees the loss that a far too large step caused."""
    X, y = separable_problem(nb_samples=200, seed=4)
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 3)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning, match=r"collapse: training loss .* up from"):
        result = train_with_decreasing_lr(
            model, X, y, batch_size=200, initial_lr=1e3, nb_lr_rounds=1, seed=0
        )
    assert result.diverged and result.nb_epochs == 1
    assert result.train_loss_history[1] > 10 * result.train_loss_history[0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
