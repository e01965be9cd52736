import numpy as np
import pytest
import torch

import structurednets
import structurednets.testing
from structurednets import BudgetTooSmallError
from structurednets.testing import layer_relative_error as relative_error
from structurednets.training_helpers import train_with_decreasing_lr
from structurednets_lowrank import LRLayer, lowrank_nb_weight_parameters


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (33, 33)])
@pytest.mark.parametrize("share", [0.1, 0.3, 0.6])
def test_svd_initialisation_is_optimal(shape, share):
    rng = np.random.default_rng(1)
    target = rng.standard_normal(shape) * np.logspace(0, -3, shape[1])
    layer = LRLayer(shape[1], shape[0], share, initial_weight_matrix=target)
    singular_values = np.linalg.svd(target, compute_uv=False)
    optimum = np.sqrt(np.sum(singular_values[layer.rank :] ** 2)) / np.linalg.norm(target)
    assert layer.rank == int(share * shape[0] * shape[1]) // (shape[0] + shape[1])
    assert relative_error(layer, target) == pytest.approx(optimum, rel=1e-5, abs=1e-7)


def test_exact_low_rank_matrix_is_recovered():
    rng = np.random.default_rng(2)
    target = rng.standard_normal((50, 4)) @ rng.standard_normal((4, 70))
    budget_share = 4 * (50 + 70) / (50 * 70)
    with structurednets.testing.default_dtype(torch.float64):
        layer = LRLayer(70, 50, budget_share, initial_weight_matrix=target)
    assert layer.rank == 4
    assert relative_error(layer, target) < 1e-12


def test_default_rank_is_largest_that_fits():
    for input_dim, output_dim, share in [(512, 256, 0.1), (2048, 2048, 0.1), (7, 3, 1.0)]:
        layer = LRLayer(input_dim, output_dim, share)
        per_rank = input_dim + output_dim
        assert layer.rank * per_rank <= share * input_dim * output_dim < (layer.rank + 1) * per_rank


def test_explicit_rank_and_factors():
    rng = np.random.default_rng(3)
    left, right = rng.standard_normal((12, 2)), rng.standard_normal((2, 9))
    layer = LRLayer(9, 12, 0.5, factors=(left, right))
    assert layer.rank == 2
    np.testing.assert_allclose(
        layer.to_dense().detach().numpy(), left @ right, rtol=1e-5, atol=1e-6
    )
    assert LRLayer(9, 12, 0.5, rank=1).rank == 1
    assert lowrank_nb_weight_parameters(9, 12, 0.5, factors=(left, right)) == 2 * 21
    assert structurednets.nb_parameters("lr", 9, 12, 0.5, rank=1) == 21 + 12


def test_option_errors_name_the_option():
    rng = np.random.default_rng(4)
    target = rng.standard_normal((12, 9))
    with pytest.raises(
        BudgetTooSmallError, match=r"rank 5 needs 105; use nb_params_share >= 0\.973"
    ):
        LRLayer(9, 12, 0.5, rank=5)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        LRLayer(9, 12, 0.5, rank=0)
    with pytest.raises(ValueError, match="either initial_weight_matrix or factors"):
        LRLayer(9, 12, 0.5, initial_weight_matrix=target, factors=(target[:, :2], target[:2]))
    with pytest.raises(ValueError, match=r"factors\[1\] \(R\) must have shape \(2, 9\)"):
        LRLayer(9, 12, 0.5, factors=(target[:, :2], target[:2, :8]))
    with pytest.raises(ValueError, match="rank=3 disagrees with the rank of factors"):
        LRLayer(9, 12, 0.5, rank=3, factors=(target[:, :2], target[:2]))


def test_budget_error_names_smallest_share():
    with pytest.raises(BudgetTooSmallError) as info:
        structurednets.create("lowrank", 100, 100, 0.01)
    assert info.value.min_share == 0.02
    assert "use nb_params_share >= 0.02" in str(info.value)
    assert LRLayer(100, 100, info.value.min_share).rank == 1


def test_learns_low_rank_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(20, 3) @ torch.randn(3, 30) / 5
    X = torch.randn(2000, 30)
    y = X @ teacher.T
    layer = LRLayer(30, 20, 0.25, use_bias=False)
    assert layer.rank == 3
    result = train_with_decreasing_lr(
        layer,
        X,
        y,
        loss_function_class=torch.nn.MSELoss,
        optimizer_class=torch.optim.Adam,
        initial_lr=0.01,
        nb_lr_rounds=4,
        patience=5,
        batch_size=200,
        max_epochs_per_round=200,
        seed=0,
    )
    relative = torch.linalg.norm(result.model.to_dense().detach() - teacher) / torch.linalg.norm(
        teacher
    )
    assert result.best_val_loss < 1e-5
    assert relative < 1e-2


def test_cost_is_what_the_products_do():
    from torch.utils.flop_counter import FlopCounterMode

    layer = LRLayer(48, 40, 0.25, use_bias=False)
    U = torch.randn(16, 48, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        layer(U).sum().backward()
    cost = layer.cost(16)
    assert cost.forward == 16 * layer.rank * (48 + 40)
    assert 2 * cost.total == counter.get_total_flops()  # FlopCounterMode counts 2 per multiply-add
    assert abs(layer.cost_ratio() - layer.rank * 88 / (48 * 40)) < 1e-12


def test_max_cost_ratio_caps_the_rank():
    layer = LRLayer(100, 60, 0.5, max_cost_ratio=0.1)
    assert layer.rank == 3 and layer.cost_ratio() <= 0.1  # 3 * 160 / 6000 = 0.08
    assert lowrank_nb_weight_parameters(100, 60, 0.5, max_cost_ratio=0.1) == 3 * 160
    assert "max_cost_ratio" not in layer.layout.sizes
    with pytest.raises(ValueError, match="max_cost_ratio must be at least 0.0267"):
        LRLayer(100, 60, 0.5, max_cost_ratio=0.01)
    with pytest.raises(ValueError, match="rank=10 costs 0.267x.*largest rank within it is 3"):
        LRLayer(100, 60, 0.5, rank=10, max_cost_ratio=0.1)
    W = np.random.default_rng(0).standard_normal((60, 100))
    fitted = structurednets.approximate(W, "lowrank", 0.5, max_cost_ratio=0.1)
    assert fitted.layer.rank == 3 and fitted.cost_ratio == pytest.approx(0.08)
    assert "cost 0.08x dense" in str(fitted)
