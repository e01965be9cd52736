"""Core's autocast policy (structurednets.precision) on test-only structures."""

import copy
import warnings

import pytest
import torch
from diagonal_structure import DiagonalLayer
from torch import nn

from structurednets import StructuredLayer
from structurednets.precision import (
    SlowFallbackWarning,
    accumulation_dtype,
    autocast_dtype,
    cast_for_autocast,
    reset_slow_fallback_warnings,
    warn_slow_fallback,
)


class Recurrence(StructuredLayer):
    """Square layer ``y_i = decay * y_(i-1) + scale_i * u_i``: W is lower triangular with
    ``W[i, j] = decay ** (i - j) * scale_j``. A long recursion: in bfloat16 the rounding of
    ``decay`` and of every partial sum compounds, so it keeps ``decay`` in float32 and runs
    the recursion in the accumulation dtype."""

    structure_name = "recurrence"
    autocast_full_precision = ("decay",)

    def __init__(self, dim, use_bias=True):
        super().__init__(dim, dim, 1.0, use_bias)
        self.decay = nn.Parameter(torch.tensor(0.999))
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []

    def layout_sizes(self):
        return {}

    def multiply(self, U):
        self.seen.append((U.dtype, self.decay.dtype, self.scale.dtype))
        steps = U * self.scale
        state_dtype = accumulation_dtype(U.dtype)
        decay = self.decay.to(state_dtype)
        state = steps.new_zeros(U.shape[0], dtype=state_dtype)
        outputs = []
        for i in range(self.input_dim):
            state = decay * state + steps[:, i].to(state_dtype)
            outputs.append(state)
        return torch.stack(outputs, dim=1).to(U.dtype)


class RoundedRecurrence(Recurrence):
    """The same recursion without the opt-out: everything in the autocast dtype."""

    autocast_full_precision = ()


def _relative_error(result, reference):
    return float((result.double() - reference).norm() / reference.norm())


def test_autocast_dtype_follows_the_device_state():
    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        assert autocast_dtype("meta") is None  # no autocast on the meta device
    assert accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_returns_what_nn_linear_returns(dtype):
    torch.manual_seed(0)
    layer = DiagonalLayer(6, 4, 1.0)
    linear = nn.Linear(6, 4)
    U = torch.randn(3, 2, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        Y, Y_dense = layer(U), linear(U)
    assert Y.dtype == Y_dense.dtype == dtype and Y.shape == (3, 2, 4)
    expected = (U.detach()[..., :4].to(dtype) * layer.diagonal.detach().to(dtype)).float()
    expected = (expected.to(dtype) + layer.bias.detach().to(dtype)).float()
    torch.testing.assert_close(Y.float(), expected, rtol=0, atol=0)  # the same roundings
    Y.float().sum().backward()
    assert layer.diagonal.grad.dtype == layer.bias.grad.dtype == U.grad.dtype == torch.float32
    assert isinstance(layer.diagonal, nn.Parameter)  # the cast tensors were swapped back
    # float64 layers ignore autocast, as nn.Linear does; other inputs are cast
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        assert copy.deepcopy(layer).double()(U.double()).dtype == torch.float64
        assert layer(U.double()).dtype == dtype
    with pytest.raises(TypeError, match="float64"):
        layer(U.double())


def test_cast_for_autocast_skips_kept_and_non_floating_tensors():
    layer = Recurrence(5)
    layer.register_buffer("positions", torch.arange(5))
    cast = cast_for_autocast(layer, torch.bfloat16, keep=("decay",))
    assert sorted(cast) == ["bias", "scale"]
    assert all(t.dtype == torch.bfloat16 and t.requires_grad for t in cast.values())
    assert sorted(cast_for_autocast(layer, torch.float32)) == []  # nothing to cast


def test_a_long_recursion_opts_out_and_stays_accurate():
    dim = 256
    layer, rounded = Recurrence(dim, use_bias=False), RoundedRecurrence(dim, use_bias=False)
    rounded.load_state_dict(layer.state_dict())
    U = torch.randn(4, dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = copy.deepcopy(layer).double()(U.double())
        dense = nn.Linear(dim, dim, bias=False)
        dense.weight.copy_(layer.to_dense())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            Y, Y_rounded, Y_dense = layer(U), rounded(U), dense(U)
    assert layer.seen[-1] == (torch.bfloat16, torch.float32, torch.bfloat16)
    assert rounded.seen[-1] == (torch.bfloat16,) * 3
    assert Y.dtype == Y_rounded.dtype == torch.bfloat16
    error, error_rounded = _relative_error(Y, reference), _relative_error(Y_rounded, reference)
    error_dense = _relative_error(Y_dense, reference)
    assert error < 2 * error_dense  # only the input, the scales and the output are rounded
    assert error_rounded > 4 * error  # what the opt-out avoids
    U_grad = U.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(U_grad).float().sum().backward()
    assert layer.decay.grad.dtype == torch.float32 and torch.isfinite(layer.decay.grad)


def test_policy_compiles_without_graph_breaks():
    layer = DiagonalLayer(6, 4, 1.0)
    U = torch.randn(3, 6)
    torch._dynamo.reset()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            explanation = torch._dynamo.explain(layer)(U)
            compiled = torch.compile(layer, backend="aot_eager")(U)
            eager = layer(U)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_slow_fallback_warns_once_per_structure():
    reset_slow_fallback_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            warn_slow_fallback("first", "its kernels are CPU-only")
        warn_slow_fallback("second", "no bfloat16 kernel")
    messages = [str(w.message) for w in caught if issubclass(w.category, SlowFallbackWarning)]
    assert messages == [
        "structure 'first' runs a slow path: its kernels are CPU-only",
        "structure 'second' runs a slow path: no bfloat16 kernel",
    ]
    reset_slow_fallback_warnings()
