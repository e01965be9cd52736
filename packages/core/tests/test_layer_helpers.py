import torch

from structurednets.layers.layer_helpers import get_nb_model_parameters


def test_counts_dense_sparse_and_frozen_parameters():
    model = torch.nn.Module()
    model.dense = torch.nn.Parameter(torch.zeros(3, 4))
    indices = torch.tensor([[0, 1, 2], [1, 0, 3]])
    sparse = torch.sparse_coo_tensor(indices, torch.ones(3), (3, 4)).coalesce()
    model.sparse = torch.nn.Parameter(sparse)
    model.frozen = torch.nn.Parameter(torch.zeros(5), requires_grad=False)
    assert get_nb_model_parameters(model) == 12 + 3 + 5
    assert get_nb_model_parameters(model, count_gradientless_parameters=False) == 12 + 3


def test_linear_layer():
    assert get_nb_model_parameters(torch.nn.Linear(10, 4)) == 44


def test_shared_test_matrices():
    import numpy as np

    from structurednets.testing import best_low_rank_error, layer_relative_error, smooth_kernel

    kernel = smooth_kernel(5, 4, decay=2.0)
    assert kernel.shape == (5, 4) and kernel[3, 1] == 1.0 / 5.0 and kernel[2, 2] == 1.0
    rng = np.random.default_rng(0)
    left, right = rng.standard_normal((9, 2)), rng.standard_normal((2, 7))
    assert best_low_rank_error(left @ right, 2) < 1e-7
    assert abs(best_low_rank_error(np.diag([3.0, 4.0]), 1) - 0.6) < 1e-12
    layer = torch.nn.Linear(4, 5, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(kernel))
    layer.to_dense = lambda: layer.weight
    assert layer_relative_error(layer, kernel) < 1e-7
