"""compress(calibration=...): hooks collect each layer's inputs, each layer fits its own."""

import copy

import pytest
import torch
from torch import nn

from structurednets import approximate, compress


class TwoInputs(nn.Module):
    """fc1 on a, fc2 on relu(fc1(a)) + b; 'unused' is never called."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 5)
        self.unused = nn.Linear(5, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, a, b=None):
        hidden = torch.relu(self.fc1(a))
        if b is not None:
            hidden = hidden + b
        return self.fc2(self.drop(hidden))


def make_model(seed=0):
    torch.manual_seed(seed)
    return TwoInputs().double()


def batches(seed=1, count=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(20, 6, generator=generator, dtype=torch.float64) for _ in range(count)]


def test_each_layer_fits_its_own_inputs(diagonal_structure):
    model = make_model()
    data = batches()
    compressed, report = compress(model, "diagonal", 1.0, calibration=data, exclude="unused")
    fc1_inputs = torch.cat(data)
    with torch.no_grad():
        fc2_inputs = torch.relu(model.fc1(fc1_inputs))
    for name, X in (("fc1", fc1_inputs), ("fc2", fc2_inputs)):
        linear = getattr(model, name)
        expected = approximate(linear.weight, "diagonal", 1.0, inputs=X, dtype=torch.float64)
        got = getattr(compressed, name)
        torch.testing.assert_close(got.to_dense(), expected.layer.to_dense(), rtol=1e-7, atol=1e-9)
        (row,) = [layer for layer in report.layers if layer.name == name]
        assert row.output_relative_error == pytest.approx(expected.output_relative_error, rel=1e-6)
    assert "out error" in str(report)
    assert model.training and compressed.training  # eval mode only during the pass


def test_tuple_and_dict_batches(diagonal_structure):
    model = make_model()
    a, b = batches()[0], torch.rand(20, 5, dtype=torch.float64)
    _, by_tuple = compress(model, "diagonal", 1.0, calibration=[(a, b)], exclude="unused")
    _, by_dict = compress(model, "diagonal", 1.0, calibration=[{"a": a, "b": b}], exclude="unused")
    with torch.no_grad():
        fc2_inputs = torch.relu(model.fc1(a)) + b
    expected = approximate(model.fc2.weight, "diagonal", 1.0, inputs=fc2_inputs)
    for report in (by_tuple, by_dict):
        assert report.layers[1].output_relative_error == pytest.approx(
            expected.output_relative_error, rel=1e-6
        )


def test_sequential_fits_to_the_compressed_predecessors(diagonal_structure):
    model = make_model()
    data = batches()
    compressed, report = compress(
        model, "diagonal", 1.0, calibration=iter(data), sequential=True, exclude="unused"
    )
    X = torch.cat(data)
    with torch.no_grad():
        fc2_inputs = torch.relu(compressed.fc1(X))  # from the already-compressed fc1
    expected = approximate(model.fc2.weight, "diagonal", 1.0, inputs=fc2_inputs)
    torch.testing.assert_close(
        compressed.fc2.to_dense(), expected.layer.to_dense().double(), rtol=1e-6, atol=1e-8
    )
    assert [layer.name for layer in report.layers] == ["fc1", "fc2"]
    parallel, _ = compress(model, "diagonal", 1.0, calibration=data, exclude="unused")
    assert not torch.allclose(parallel.fc2.to_dense(), compressed.fc2.to_dense())


def test_unreached_layer_is_named_and_nothing_changes(diagonal_structure):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"never reached the selected layer\(s\) \['unused'\]"):
        compress(model, "diagonal", 1.0, calibration=batches(), inplace=True)
    assert type(model.fc1) is nn.Linear and type(model.unused) is nn.Linear
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_bad_calibration_arguments(diagonal_structure):
    model = make_model()
    with pytest.raises(TypeError, match="calibration must be an iterable of batches"):
        compress(model, "diagonal", 1.0, calibration=torch.randn(4, 6))
    with pytest.raises(ValueError, match="sequential=True needs calibration"):
        compress(model, "diagonal", 1.0, sequential=True)
    with pytest.raises(ValueError, match="calibration holds no batches"):
        compress(model, "diagonal", 1.0, calibration=[], exclude="unused")
    with pytest.raises(TypeError, match="each calibration batch must be"):
        compress(model, "diagonal", 1.0, calibration=[3.0], exclude="unused")
    nan = torch.full((2, 6), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="inputs of layer 'fc1' must be finite"):
        compress(model, "diagonal", 1.0, calibration=[nan], exclude="unused")


def test_without_calibration_no_output_error(diagonal_structure):
    _, report = compress(make_model(), "diagonal", 1.0, exclude="unused")
    assert all(layer.output_relative_error is None for layer in report.layers)
    assert "out error" not in str(report)
