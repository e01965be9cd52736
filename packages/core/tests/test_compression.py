import copy

import numpy as np
import pytest
import torch
from full_structure import FullLayer, full_nb_weight_parameters
from torch import nn

import structurednets
from structurednets import CompressionReport, compress, get_nb_model_parameters
from structurednets.training_helpers import train_with_decreasing_lr


@pytest.fixture
def full_structure():
    structure = structurednets.register("full", FullLayer, full_nb_weight_parameters)
    yield structure
    structurednets.unregister("full")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def diagonal_only(linear):
    """Independent: the diagonal approximation of a Linear, as a dense Linear."""
    dense = copy.deepcopy(linear)
    with torch.no_grad():
        size = min(dense.weight.shape)
        diagonal = torch.diagonal(dense.weight)[:size].clone()
        dense.weight.zero_()
        dense.weight[range(size), range(size)] = diagonal
    return dense


def test_replaces_every_linear_on_a_copy(diagonal_structure):
    model = mlp()
    original = copy.deepcopy(model)
    compressed, report = compress(model, "diag", 0.5)
    # the original is untouched
    for before, after in zip(original.parameters(), model.parameters(), strict=True):
        assert torch.equal(before, after)
    assert all(isinstance(compressed[i], structurednets.StructuredLayer) for i in (0, 2, 4))
    expected = nn.Sequential(*(diagonal_only(m) if isinstance(m, nn.Linear) else m for m in model))
    U = torch.randn(5, 12)
    torch.testing.assert_close(compressed(U), expected(U))

    assert isinstance(report, CompressionReport)
    assert [layer.name for layer in report.layers] == ["0", "2", "4"]
    first = report.layers[0]
    assert (first.input_dim, first.output_dim, first.structure) == (12, 16, "diagonal")
    assert first.nb_parameters_before == 12 * 16 + 16
    assert first.nb_parameters_after == 12 + 16
    W = model[0].weight.detach().double()
    rest = W - diagonal_only(model[0]).weight.detach().double()
    assert first.relative_error == pytest.approx(float(rest.norm() / W.norm()), rel=1e-6)
    assert report.model_nb_parameters_before == get_nb_model_parameters(model)
    assert report.model_nb_parameters_after == get_nb_model_parameters(compressed)
    assert report.nb_parameters_before == report.model_nb_parameters_before
    assert report.nb_parameters_after == (12 + 16) + (16 + 16) + (3 + 3)
    assert report.skipped == ()


def test_inplace(diagonal_structure):
    model = mlp()
    compressed, _ = compress(model, "diagonal", 0.5, inplace=True)
    assert compressed is model and isinstance(model[2], structurednets.StructuredLayer)


def test_selection_by_pattern_and_size(diagonal_structure):
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model.head = nn.Linear(4, 2)

    def replaced(**selection):
        _, report = compress(model, "diagonal", 1.0, **selection)
        return [layer.name for layer in report.layers]

    assert replaced() == ["encoder.0", "encoder.1", "head"]
    assert replaced(include="encoder.*") == ["encoder.0", "encoder.1"]
    assert replaced(include=["head", "encoder.1"]) == ["encoder.1", "head"]
    assert replaced(exclude="encoder.?") == ["head"]
    assert replaced(min_size=32) == ["encoder.0", "encoder.1"]
    assert replaced(min_size=33) == ["encoder.0"]
    with pytest.raises(ValueError, match=r"no nn.Linear module matches include=\('decoder\.\*',\)"):
        compress(model, "diagonal", 1.0, include="decoder.*")
    with pytest.raises(ValueError, match="modules are 'encoder.0', 'encoder.1', 'head'"):
        compress(model, "diagonal", 1.0, min_size=1000)


def test_layer_keeps_dtype_mode_and_frozen_weights(diagonal_structure):
    model = mlp().double().eval()
    model[0].requires_grad_(False)
    compressed, _ = compress(model, "diagonal", 0.5)
    assert all(p.dtype == torch.float64 for p in compressed.parameters())
    assert not compressed.training and not compressed[0].training
    assert not any(p.requires_grad for p in compressed[0].parameters())
    assert all(p.requires_grad for p in compressed[2].parameters())
    U = torch.randn(3, 12, dtype=torch.float64)
    expected = nn.Sequential(*(diagonal_only(m) if isinstance(m, nn.Linear) else m for m in model))
    torch.testing.assert_close(compressed(U), expected(U), rtol=1e-12, atol=1e-12)


def test_shared_layer_is_replaced_everywhere(diagonal_structure):
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    compressed, report = compress(model, "diagonal", 0.5)
    assert [layer.name for layer in report.layers] == ["0"]
    assert compressed[0] is compressed[2]
    assert isinstance(compressed[2], structurednets.StructuredLayer)


def test_model_that_is_a_linear(diagonal_structure):
    linear = nn.Linear(5, 4)
    compressed, report = compress(linear, "diagonal", 0.5, inplace=True)
    assert isinstance(compressed, structurednets.StructuredLayer)
    assert report.layers[0].name == ""
    assert str(report).splitlines()[2].startswith("(model)         4x5 diagonal")


def test_attention_projection_is_left_alone(diagonal_structure):
    model = nn.Module()
    model.attention = nn.MultiheadAttention(8, 2)
    model.out = nn.Linear(8, 8)
    compressed, report = compress(model, "diagonal", 0.5)
    assert [layer.name for layer in report.layers] == ["out"]
    assert type(compressed.attention.out_proj) is not nn.Linear  # its own subclass, kept
    x = torch.randn(3, 1, 8)
    compressed.attention(x, x, x)


def test_too_small_budget_keeps_the_layer_dense(diagonal_structure):
    model = mlp()
    # at share 0.05 the diagonals need 12 > 9, 16 > 12 and 3 > 2 weight scalars
    compressed, report = compress(model, "diagonal", 0.05)
    assert [layer.name for layer in report.layers] == []
    assert [layer.name for layer in report.skipped] == ["0", "2", "4"]
    assert "use nb_params_share >= 0.0625" in report.skipped[0].reason
    assert isinstance(compressed[0], nn.Linear)
    table = str(report)
    assert "kept dense: 0 (16x12): nb_params_share=0.05 allows 9 weight parameters" in table


def test_best_per_layer(diagonal_structure, full_structure):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    lines = []
    _, report = compress(model, ["full", "diagonal"], 1.0, progress=lines.append)
    # ties in error (0 for the diagonal weight) go to the cheaper structure
    assert [layer.structure for layer in report.layers] == ["diagonal", "full"]
    assert [layer.relative_error for layer in report.layers] == [0.0, pytest.approx(0, abs=1e-7)]
    assert lines[0] == "    full: relative error 0, " + lines[0].split(", ")[1]
    assert lines[2].startswith("[1/2] 0 (4x4): diagonal, relative error 0, 20 -> 8 parameters")


def test_report_table_and_progress(diagonal_structure):
    lines = []
    _, report = compress(mlp(), "diagonal", 0.5, include=["0", "2"], progress=lines.append)
    assert len(lines) == 2 and lines[1].startswith("[2/2] 2 (16x16): diagonal, relative error")
    table = str(report).splitlines()
    assert table[0].split() == [
        "layer", "out", "x", "in", "structure", "params", "before", "params", "after",
        "share", "cost", "rel.", "error",
    ]  # fmt: skip
    assert table[2].split()[:7] == [
        "0",
        "16x12",
        "diagonal",
        "208",
        "28",
        "0.500",
        "0.06",
    ]  # 12 / 192
    assert table[5].split() == ["total", "480", "60"]
    assert table[6].startswith("model: 531 -> 111 parameters (20.9%); 2 layer(s) replaced in")


def test_bad_arguments(diagonal_structure):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        compress(np.ones((3, 3)), "diagonal", 0.5)
    with pytest.raises(ValueError, match="has no nn.Linear module"):
        compress(nn.ReLU(), "diagonal", 0.5)
    with pytest.raises(structurednets.UnknownStructureError):
        compress(mlp(), "nosuch", 0.5)
    with pytest.raises(structurednets.UnknownStructureError):
        compress(mlp(), ["diagonal", "nosuch"], 0.5)
    with pytest.raises(ValueError, match=r"nb_params_share must be in \(0, 1\]"):
        compress(mlp(), "diagonal", 0)
    with pytest.raises(ValueError, match="min_size must be a positive integer"):
        compress(mlp(), "diagonal", 0.5, min_size=0)
    with pytest.raises(TypeError, match="include must be a glob pattern"):
        compress(mlp(), "diagonal", 0.5, include=[3])


def test_best_without_structures():
    if structurednets.available():
        pytest.skip("a plugin is installed in this environment")
    with pytest.raises(structurednets.NoStructureFitsError, match="no structures are installed"):
        compress(mlp(), "best", 0.5)


def test_fine_tuning_the_compressed_model(diagonal_structure):
    """The compressed model trains like any model; here it recovers a diagonal teacher."""
    torch.manual_seed(0)
    teacher = torch.diag(torch.linspace(0.5, 2.0, 6))
    X = torch.randn(400, 6)
    y = X @ teacher.T
    student, _ = compress(nn.Linear(6, 6), "diagonal", 0.5)
    result = train_with_decreasing_lr(
        student,
        X,
        y,
        loss_function_class=nn.MSELoss,
        optimizer_class=torch.optim.Adam,
        initial_lr=0.05,
        nb_lr_rounds=3,
        patience=5,
        batch_size=50,
        max_epochs_per_round=100,
        seed=0,
    )
    assert result.best_val_loss < 1e-6
    torch.testing.assert_close(student.to_dense().detach(), teacher, atol=1e-3, rtol=0)
