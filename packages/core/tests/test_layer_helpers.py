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
