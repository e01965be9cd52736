"""Checks of layouts: a fitted layer's shape is data, and restores without refitting."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import structurednets
from structurednets.layout import Layout
from structurednets.testing.case import (
    ConformanceCase,
    assert_same_outputs,
    default_dtype,
    raises,
)
from structurednets.validation import BudgetTooSmallError


def fitted_layers(case: ConformanceCase) -> list[structurednets.StructuredLayer]:
    """A random layer and layers fitted to noise and to a smooth kernel (fits decide shapes)."""
    input_dim, output_dim = case.shape
    rows, cols = np.linspace(0, 1, output_dim), np.linspace(0, 1, input_dim)
    kernel = 1.0 / (1.0 + 20.0 * np.abs(rows[:, None] - cols[None, :]))
    noise = np.random.default_rng(3).standard_normal((output_dim, input_dim))
    return [
        case.build(seed=2),
        case.build(initial_weight_matrix=noise),
        case.build(initial_weight_matrix=kernel, use_bias=False),
    ]


def check_layout_round_trip(case: ConformanceCase) -> None:
    """``layer.layout`` is frozen JSON; ``create(name, layout=...)`` builds exactly that shape:
    the same parameters and buffers, the parameter count ``nb_parameters(name, layout=...)``
    predicts, and the fitted layer's state dict loads into it with identical outputs."""
    for layer in fitted_layers(case):
        layout = layer.layout
        assert isinstance(layout, Layout), f"layer.layout is a {type(layout).__name__}"
        assert layout.structure == structurednets.get_structure(case.structure).name
        assert (layout.input_dim, layout.output_dim) == (layer.input_dim, layer.output_dim)
        assert layout.bias == (layer.bias is not None)
        text = json.dumps(layout.to_json())
        assert Layout.from_json(text) == layout, "the layout changes through JSON"
        assert hash(Layout.from_json(text)) == hash(layout)
        with default_dtype(torch.float64):  # the dtype case.build gives
            twin = structurednets.create(case.structure, layout=layout)
        assert twin.layout == layout, f"create(layout=) built {twin.layout}, not {layout}"
        shapes = {
            key: value.shape for key, value in layer.state_dict().items() if torch.is_tensor(value)
        }
        twin_shapes = {
            key: value.shape for key, value in twin.state_dict().items() if torch.is_tensor(value)
        }
        assert twin_shapes == shapes, f"create(layout=) has tensors {twin_shapes}, not {shapes}"
        predicted = structurednets.nb_parameters(case.structure, layout=layout)
        assert predicted == layer.get_nb_parameters() == twin.get_nb_parameters(), (
            f"nb_parameters(layout=) says {predicted}; the fitted layer has "
            f"{layer.get_nb_parameters()}, the one built from its layout {twin.get_nb_parameters()}"
        )
        twin.load_state_dict(layer.state_dict())
        assert_same_outputs(layer, twin, "load_state_dict into create(layout=layer.layout)")


def check_layout_mismatch_is_refused(case: ConformanceCase) -> None:
    """A state dict loaded into a layer of another layout is refused, naming the difference."""
    layer = case.build()
    for share in (*case.shares, 1.0):
        try:
            other = case.build(share=share)
        except BudgetTooSmallError:
            continue
        if other.layout != layer.layout:
            difference = other.layout.differences(layer.layout)[0].split(" ")[0]
            with raises(RuntimeError, "differ", difference):
                layer.load_state_dict(other.state_dict())
            return
    raise AssertionError("no share gives a layer of another layout to test the refusal with")


def check_save_and_load(case: ConformanceCase) -> None:
    """``structurednets.save`` of a model holding a fitted layer, then ``structurednets.load``
    into the uncompressed architecture: identical outputs, no fit, no pickle."""
    input_dim, output_dim = case.shape

    def architecture() -> nn.Module:
        return nn.Sequential(nn.Linear(input_dim, output_dim), nn.Tanh(), nn.Linear(output_dim, 3))

    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = architecture()
        for layer in fitted_layers(case)[1:]:
            model[0] = layer
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.safetensors"
                structurednets.save(model, path)
                restored = structurednets.load(path, architecture())
            assert isinstance(restored[0], type(layer)) and restored[0].layout == layer.layout
            U = torch.randn(6, input_dim, dtype=torch.float64)
            with torch.no_grad():
                assert torch.equal(restored(U), model(U)), "save/load changed the outputs"
