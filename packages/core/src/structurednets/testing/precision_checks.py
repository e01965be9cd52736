"""Checks of the mixed-precision policy (:mod:`structurednets.precision`): autocast, layers
converted to float16 and bfloat16, and autocast under ``torch.compile``.

Errors are measured against the float64 layer and bounded by :data:`ERROR_FACTOR` times the
error of an ``nn.Linear`` holding the same weight, in the same precision and on the same input:
a structure may round more often than one matrix product does (one rounding per factor or
per stage), but not more than a few times as badly.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from structurednets.layers.structured_layer import StructuredLayer
from structurednets.testing.case import ConformanceCase, inputs, skip

__all__ = [
    "ERROR_FACTOR",
    "REDUCED",
    "check_autocast_compiles",
    "check_autocast_on",
    "check_converted_on",
    "check_cuda_precision",
    "check_dtypes_and_autocast",
    "check_reduced_precision_layers",
]

#: How many times a bfloat16 / float16 ``nn.Linear``'s relative error (same weight, input and
#: precision, against float64) a structured layer's error may be.
ERROR_FACTOR = 4.0

#: The reduced precisions every structure is checked in.
REDUCED = (torch.bfloat16, torch.float16)


def _error(result: torch.Tensor, reference: torch.Tensor) -> float:
    result, reference = result.double().cpu(), reference.double().cpu()
    return float(torch.linalg.norm(result.double() - reference) / torch.linalg.norm(reference))


def dense_twin(layer: StructuredLayer) -> nn.Linear:
    """An ``nn.Linear`` with ``layer``'s weight and bias, in ``layer``'s dtype and device."""
    with torch.no_grad():
        weight = layer.to_dense()
        linear = nn.Linear(layer.input_dim, layer.output_dim, bias=layer.bias is not None)
        linear = linear.to(dtype=weight.dtype, device=weight.device)
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear


def _forward_backward(module: nn.Module, U: torch.Tensor, gradient: torch.Tensor):
    """``(output, input gradient)`` of ``module(U)`` with ``gradient`` as output gradient."""
    U = U.detach().clone().requires_grad_(True)
    Y = module(U)
    (Y.float() * gradient).sum().backward()
    return Y.detach(), U.grad


def _within(what: str, error: float, dense_error: float, dtype: torch.dtype) -> None:
    bound = ERROR_FACTOR * dense_error
    assert error <= bound, (
        f"{what} in {dtype}: relative error {error:.2e} against float64, more than "
        f"{ERROR_FACTOR:g} x the {dense_error:.2e} of an nn.Linear with the same weight"
    )


def check_dtypes_and_autocast(case: ConformanceCase) -> None:
    """Under CPU autocast in bfloat16 and float16 the layer returns what ``nn.Linear``
    returns (its dtype), its output and input gradient are within :data:`ERROR_FACTOR` of
    ``nn.Linear``'s error, and its parameters' gradients are finite, float32 and close to
    the float32 ones; float32 agrees with float64; a float64 layer ignores autocast."""
    layer64 = case.build(dtype=torch.float64)
    U = inputs(layer64, 16)
    with torch.no_grad():
        error32 = _error(copy.deepcopy(layer64).float()(U.float()), layer64(U))
    assert error32 < 1e-5, f"float32 result differs from float64 by {error32:.2e} (relative)"
    check_autocast_on(case, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert layer64(U).dtype == torch.float64, "a float64 layer must ignore autocast"


def check_autocast_on(
    case: ConformanceCase, device: str, dtypes: tuple[torch.dtype, ...] = REDUCED
) -> None:
    """The autocast part of :func:`check_dtypes_and_autocast` on ``device`` ("cpu", "cuda")."""
    layer64 = case.build(dtype=torch.float64)
    U = inputs(layer64, 16)
    gradient = torch.randn(16, layer64.output_dim, generator=torch.Generator().manual_seed(3))
    reference, reference_grad = _forward_backward(layer64, U, gradient.double())
    layer32 = copy.deepcopy(layer64).float().to(device)
    U, gradient = U.float().to(device), gradient.to(device)
    _forward_backward(layer32, U, gradient)
    grads32 = {name: p.grad.clone() for name, p in layer32.named_parameters()}
    linear = dense_twin(layer32)
    for dtype in dtypes:
        layer32.zero_grad()
        with torch.autocast(device, dtype=dtype):
            Y, U_grad = _forward_backward(layer32, U, gradient)
            Y_dense, U_grad_dense = _forward_backward(linear, U, gradient)
        assert Y.dtype == Y_dense.dtype, (
            f"under autocast({device}, {dtype}) the layer returns {Y.dtype}, nn.Linear "
            f"{Y_dense.dtype}"
        )
        assert torch.isfinite(Y).all(), f"non-finite output under {dtype} autocast"
        _within("autocast output", _error(Y, reference), _error(Y_dense, reference), dtype)
        assert U_grad.dtype == torch.float32, f"input gradient is {U_grad.dtype}, not float32"
        _within(
            "autocast input gradient",
            _error(U_grad, reference_grad),
            _error(U_grad_dense, reference_grad),
            dtype,
        )
        for name, parameter in layer32.named_parameters():
            grad = parameter.grad
            assert grad is not None and grad.dtype == torch.float32, (
                f"gradient of {name} under {dtype} autocast: {None if grad is None else grad.dtype}"
            )
            assert torch.isfinite(grad).all(), f"non-finite gradient of {name} under autocast"
            if grads32[name].norm() > 0:
                error = _error(grad, grads32[name])
                assert error < 0.1, f"gradient of {name} under {dtype} autocast off by {error:.2e}"


def check_reduced_precision_layers(case: ConformanceCase) -> None:
    """Layers converted with ``.to(torch.bfloat16)`` / ``.to(torch.float16)`` run forward,
    backward and ``to_dense`` on the CPU in that dtype, within :data:`ERROR_FACTOR` of an
    ``nn.Linear`` converted the same way."""
    check_converted_on(case, "cpu")


def check_converted_on(
    case: ConformanceCase, device: str, dtypes: tuple[torch.dtype, ...] = REDUCED
) -> None:
    """:func:`check_reduced_precision_layers` on ``device`` ("cpu", "cuda")."""
    layer64 = case.build(dtype=torch.float64)
    U = inputs(layer64, 8)
    gradient = torch.randn(8, layer64.output_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = layer64(U)
    linear = dense_twin(layer64.float())
    U, gradient = U.to(device), gradient.to(device)
    for dtype in dtypes:
        layer = copy.deepcopy(layer64).to(device=device, dtype=dtype)
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            if tensor.is_floating_point():
                assert tensor.dtype == dtype, f"{name} stayed {tensor.dtype} after .to({dtype})"
        Y, U_grad = _forward_backward(layer, U.to(dtype), gradient.to(dtype))
        assert Y.dtype == dtype and U_grad.dtype == dtype, f"{dtype} layer gave {Y.dtype}"
        dense = copy.deepcopy(linear).to(device=device, dtype=dtype)
        Y_dense, _ = _forward_backward(dense, U.to(dtype), gradient)
        _within(
            f"layer converted to {dtype}", _error(Y, reference), _error(Y_dense, reference), dtype
        )
        for name, parameter in layer.named_parameters():
            assert parameter.grad is not None and parameter.grad.dtype == dtype, name
            assert torch.isfinite(parameter.grad).all(), f"non-finite gradient of {name} ({dtype})"
        with torch.no_grad():
            dense = layer.to_dense()
        assert dense.dtype == dtype and torch.isfinite(dense).all(), f"to_dense in {dtype}"


def check_cuda_precision(case: ConformanceCase) -> None:
    """On a CUDA device: :func:`check_autocast_on` and :func:`check_converted_on` there."""
    if not torch.cuda.is_available():
        skip("no CUDA device here; run the kit on a machine with a GPU to check it")
    check_autocast_on(case, "cuda")
    check_converted_on(case, "cuda")


def check_autocast_compiles(case: ConformanceCase) -> None:
    """Under bfloat16 autocast, the compiled layer (``case.compile_backend`` or
    ``STRUCTUREDNETS_COMPILE_BACKEND``) returns bfloat16, agrees with eager mode and gives
    the same float32 gradients. (Not named ``torch_compile...``: the inductor session, which
    selects those, would spend 15-50 s more per structure on it.)"""
    backend = os.environ.get("STRUCTUREDNETS_COMPILE_BACKEND", case.compile_backend)
    layer = case.build(dtype=torch.float32)
    eager = copy.deepcopy(layer)
    U = inputs(layer, 8)
    gradient = torch.randn(8, layer.output_dim, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            Y, U_grad = _forward_backward(compiled, U, gradient)
            Y_eager, U_grad_eager = _forward_backward(eager, U, gradient)
    finally:
        torch._dynamo.reset()
    assert Y.dtype == torch.bfloat16, f"compiled layer under autocast returns {Y.dtype}"
    torch.testing.assert_close(Y.float(), Y_eager.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(U_grad, U_grad_eager, rtol=2e-2, atol=2e-2)
    for (name, p), p_eager in zip(layer.named_parameters(), eager.parameters(), strict=True):
        assert p.grad.dtype == torch.float32, f"gradient of {name} is {p.grad.dtype}"
        torch.testing.assert_close(p.grad, p_eager.grad, rtol=2e-2, atol=2e-2, msg=name)
