import math

import numpy as np
import pytest
import torch

from structurednets.training_helpers import TrainingResult, train_with_decreasing_lr


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
