"""Checks that a structure works in real training setups: compiled, distributed, mixed
precision, on other devices, saved and restored, on awkward matrices, and on random
arguments (property-based, with hypothesis)."""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch

import structurednets
from structurednets.layers.layer_helpers import get_nb_model_parameters
from structurednets.testing.case import (
    ConformanceCase,
    default_dtype,
    inputs,
    raises,
    relative_error,
    skip,
)
from structurednets.training_helpers import train_with_decreasing_lr
from structurednets.validation import BudgetTooSmallError, weight_budget


def check_torch_compile(case: ConformanceCase) -> None:
    """Forward and backward compile (``torch.compile``), agree with eager mode, and cause at
    most ``case.max_graph_breaks`` graph breaks (reported as a warning when there are any).

    The backend is ``case.compile_backend`` ("aot_eager" traces forward and backward without
    generating code), or the environment variable ``STRUCTUREDNETS_COMPILE_BACKEND``.
    """
    backend = os.environ.get("STRUCTUREDNETS_COMPILE_BACKEND", case.compile_backend)
    layer = case.build(dtype=torch.float32)
    eager = copy.deepcopy(layer)
    U = inputs(layer, 8)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(U)
    reasons = [str(getattr(reason, "reason", reason)) for reason in explanation.break_reasons]
    assert explanation.graph_break_count <= case.max_graph_breaks, (
        f"{explanation.graph_break_count} graph breaks (at most {case.max_graph_breaks} "
        f"allowed): {reasons}"
    )
    if explanation.graph_break_count:
        warnings.warn(
            f"{case.structure}: {explanation.graph_break_count} graph break(s) under "
            f"torch.compile: {reasons}",
            stacklevel=2,
        )
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend)
    for batch in (8, 3):  # a second batch size must not break (recompiles or dynamic shapes)
        U_compiled = inputs(layer, batch, seed=batch).requires_grad_(True)
        U_eager = U_compiled.detach().clone().requires_grad_(True)
        Y_compiled, Y_eager = compiled(U_compiled), eager(U_eager)
        torch.testing.assert_close(Y_compiled, Y_eager, rtol=1e-4, atol=1e-5)
        gradient = torch.randn_like(Y_eager)
        layer.zero_grad()
        eager.zero_grad()
        Y_compiled.backward(gradient)
        Y_eager.backward(gradient)
        torch.testing.assert_close(U_compiled.grad, U_eager.grad, rtol=1e-4, atol=1e-5)
        for (name, compiled_p), eager_p in zip(
            layer.named_parameters(), eager.parameters(), strict=True
        ):
            torch.testing.assert_close(
                compiled_p.grad, eager_p.grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}"
            )
    torch._dynamo.reset()


def check_follows_module_device(case: ConformanceCase) -> None:
    """Forward and backward on the ``meta`` device: nothing in the layer is created on the CPU
    regardless of the module's device (a CPU-only stand-in for a GPU check)."""
    layer = case.build(dtype=torch.float32).to("meta")
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        assert tensor.device.type == "meta", f"{name} did not follow .to('meta')"
    U = torch.empty(4, layer.input_dim, device="meta", requires_grad=True)
    try:
        Y = layer(U)
        Y.sum().backward()
        dense = layer.to_dense()
    except NotImplementedError as error:
        skip(f"an operation of the layer has no meta-device kernel: {str(error)[:200]}")
    except RuntimeError as error:
        raise AssertionError(
            f"forward/backward on the meta device failed; is a tensor created on a fixed device? "
            f"{str(error)[:500]}"
        ) from error
    assert Y.device.type == "meta" and Y.shape == (4, layer.output_dim)
    assert dense.device.type == "meta" and U.grad.device.type == "meta"


def check_cuda(case: ConformanceCase) -> None:
    """On a CUDA device: every tensor follows ``.cuda()``, and forward, backward and
    ``to_dense`` agree with the CPU."""
    if not torch.cuda.is_available():
        skip("no CUDA device here; run the kit on a machine with a GPU to check it")
    layer = case.build(dtype=torch.float32)
    on_gpu = copy.deepcopy(layer).cuda()
    for name, tensor in [*on_gpu.named_parameters(), *on_gpu.named_buffers()]:
        assert tensor.is_cuda, f"{name} stayed on {tensor.device} after .cuda()"
    U = inputs(layer, 32).requires_grad_(True)
    U_gpu = U.detach().cuda().requires_grad_(True)
    Y, Y_gpu = layer(U), on_gpu(U_gpu)
    assert Y_gpu.is_cuda
    torch.testing.assert_close(Y_gpu.cpu(), Y, rtol=1e-4, atol=1e-5)
    gradient = torch.randn_like(Y)
    Y.backward(gradient)
    Y_gpu.backward(gradient.cuda())
    torch.testing.assert_close(U_gpu.grad.cpu(), U.grad, rtol=1e-4, atol=1e-5)
    for (name, p), p_gpu in zip(layer.named_parameters(), on_gpu.parameters(), strict=True):
        torch.testing.assert_close(p_gpu.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(on_gpu.to_dense().cpu(), layer.to_dense(), rtol=1e-4, atol=1e-5)
    fresh = case.build(seed=3, dtype=torch.float32)
    fresh.load_state_dict(on_gpu.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(U), Y, rtol=1e-4, atol=1e-5)


def check_distributed_training(case: ConformanceCase) -> None:
    """DistributedDataParallel and FSDP (``fully_shard``) in 2 processes (gloo, loopback):
    the ranks' parameters stay identical and equal a single process on the combined batch."""
    from structurednets.testing.distributed import train_data_parallel

    layer = case.build(dtype=torch.float64)
    X = inputs(layer, 16, seed=4)
    Y = torch.randn(16, layer.output_dim, generator=torch.Generator().manual_seed(5), dtype=X.dtype)
    steps, lr = 3, case.sgd_lr
    single = copy.deepcopy(layer)
    optimiser = torch.optim.SGD(single.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(single(X), Y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    expected = dict(single.named_parameters())
    run = train_data_parallel(layer, X, Y, steps=steps, lr=lr)
    for wrapper, ranks in (("DDP", run.ddp), ("FSDP", run.fsdp)):
        for name, value in expected.items():
            torch.testing.assert_close(
                ranks[0][name],
                ranks[1][name],
                rtol=0,
                atol=0,
                msg=f"{wrapper}: ranks differ in {name}",
            )
            torch.testing.assert_close(
                ranks[0][name],
                value.detach(),
                rtol=1e-9,
                atol=1e-12,
                msg=f"{wrapper}: {name} differs from single-process training",
            )


def check_state_dict_mismatch_is_refused(case: ConformanceCase) -> None:
    """Loading a state dict of another shape or another structure fails with a message that
    says what differs (another layout of the same sizes: ``check_layout_mismatch_is_refused``)."""
    layer = case.build()
    input_dim, output_dim = case.shape
    other_shape = None
    for other_output_dim in (output_dim + 1, 2 * output_dim):  # 2x for block structures
        for share in (case.share, 1.0):
            try:
                other_shape = case.build(input_dim, other_output_dim, share)
            except ValueError:  # budget too small, or a shape the options do not allow
                continue
            break
        if other_shape is not None:
            break
    assert other_shape is not None, f"no layer with another output_dim than {output_dim} builds"
    other_output_dim = other_shape.output_dim
    with raises(RuntimeError, f"{other_output_dim} x {input_dim}", f"{output_dim} x {input_dim}"):
        layer.load_state_dict(other_shape.state_dict())
    foreign = dict(layer.state_dict())
    foreign["_extra_state"] = {**foreign["_extra_state"], "structure": "another"}
    with raises(RuntimeError, "'another'", f"'{layer.structure_name}'"):
        layer.load_state_dict(foreign)
    with raises(RuntimeError, "Missing key"):
        layer.load_state_dict(torch.nn.Linear(input_dim, output_dim).state_dict())


def _awkward_matrices(rows: int, cols: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "zeros": np.zeros((rows, cols)),
        "huge dynamic range (1e-8 to 1e8)": rng.standard_normal((rows, cols))
        * 10.0 ** rng.uniform(-8, 8, (rows, cols)),
        "rank one": np.outer(rng.standard_normal(rows), rng.standard_normal(cols)),
    }


def check_approximation_robustness(case: ConformanceCase) -> None:
    """Fitting zeros, a huge dynamic range, a rank-1 matrix, 1 x n and n x 1 matrices gives
    finite layers no worse than the zero matrix, or raises a clear ValueError/TypeError."""
    input_dim, output_dim = case.shape
    attempts = [
        (input_dim, output_dim, case.share, name, matrix)
        for name, matrix in _awkward_matrices(output_dim, input_dim).items()
    ]
    rng = np.random.default_rng(8)
    attempts += [
        (9, 1, 1.0, "1 x 9", rng.standard_normal((1, 9))),
        (1, 9, 1.0, "9 x 1", rng.standard_normal((9, 1))),
    ]
    for dims_in, dims_out, share, name, matrix in attempts:
        for dtype in (torch.float64, torch.float32):
            try:
                layer = case.build(
                    dims_in, dims_out, share, dtype=dtype, initial_weight_matrix=matrix
                )
            except (ValueError, TypeError) as error:
                assert str(error), f"{name}: {type(error).__name__} without a message"
                continue
            with torch.no_grad():
                dense = layer.to_dense()
                output = layer(inputs(layer, 3))
            assert torch.isfinite(dense).all(), f"{name} ({dtype}): non-finite weights"
            assert torch.isfinite(output).all(), f"{name} ({dtype}): non-finite outputs"
            if matrix.any():
                error = relative_error(dense.double(), torch.from_numpy(matrix))
                assert error <= 1.0 + 1e-3, f"{name} ({dtype}): relative error {error:.3g} > 1"


def check_divergence_is_reported(case: ConformanceCase) -> None:
    """An absurd learning rate never leaves NaN weights silently: ``train_with_decreasing_lr``
    restores the best finite weights and warns whenever a loss became non-finite."""
    layer = case.build(dtype=torch.float32)
    X = inputs(layer, 64) * 1e3
    Y = torch.randn(64, layer.output_dim, generator=torch.Generator().manual_seed(2)) * 1e3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_with_decreasing_lr(
            layer,
            X,
            Y,
            patience=1,
            batch_size=16,
            loss_function_class=torch.nn.MSELoss,
            initial_lr=1e12,
            nb_lr_rounds=1,
            max_epochs_per_round=3,
            seed=0,
        )
    for name, parameter in layer.named_parameters():
        assert torch.isfinite(parameter).all(), f"{name} is not finite after training"
    if result.diverged:
        assert any("diverged" in str(w.message) for w in caught), "divergence was not reported"


def _hypothesis():
    try:
        import hypothesis
        from hypothesis import strategies
    except ImportError:  # pragma: no cover - hypothesis comes with the 'test' extra
        skip("hypothesis is not installed (pip install structurednets[test])")
    settings = hypothesis.settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    return hypothesis, strategies, settings


def check_random_valid_arguments(case: ConformanceCase) -> None:
    """Property: for random shapes, shares and options, ``create`` either builds a layer with
    the predicted count within budget whose forward agrees with ``to_dense``, or raises
    ``BudgetTooSmallError`` (or a ValueError naming a drawn option)."""
    hypothesis, st, settings = _hypothesis()
    options = st.fixed_dictionaries({}, optional=dict(case.option_strategies))

    @settings
    @hypothesis.given(
        input_dim=st.integers(1, 40),
        output_dim=st.integers(1, 40),
        share=st.floats(0.01, 1.0),
        use_bias=st.booleans(),
        options=options,
    )
    def property_holds(input_dim, output_dim, share, use_bias, options):
        kwargs = {**case.options, **options, "use_bias": use_bias}
        try:
            predicted = structurednets.nb_parameters(
                case.structure, input_dim, output_dim, share, **kwargs
            )
        except BudgetTooSmallError:
            with raises(BudgetTooSmallError):
                case.build(input_dim, output_dim, share, **kwargs)
            return
        except ValueError as error:
            named = {**case.options, **options}
            assert any(key in str(error) for key in named), f"ValueError names no option: {error}"
            return
        layer = case.build(input_dim, output_dim, share, **kwargs)
        assert layer.get_nb_parameters() == get_nb_model_parameters(layer) == predicted
        assert layer.nb_weight_parameters <= weight_budget(input_dim, output_dim, share)
        U = inputs(layer, 3, 2)
        with torch.no_grad():
            Y = layer(U)
            assert Y.shape == (3, 2, output_dim)
            bias = 0 if layer.bias is None else layer.bias
            torch.testing.assert_close(Y, U @ layer.to_dense().T + bias, rtol=1e-9, atol=1e-10)

    property_holds()


def check_random_invalid_arguments(case: ConformanceCase) -> None:
    """Property: a random invalid dim or share raises ValueError/TypeError naming it."""
    hypothesis, st, settings = _hypothesis()
    bad_dims = st.one_of(
        st.integers(max_value=0),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.none(),
        st.booleans(),
    )
    bad_shares = st.one_of(
        st.floats().filter(lambda x: not 0.0 < x <= 1.0),
        st.integers().filter(lambda x: x != 1),
        st.text(max_size=3),
        st.none(),
        st.booleans(),
    )
    argument = st.sampled_from(["input_dim", "output_dim", "nb_params_share"])

    @settings
    @hypothesis.given(data=st.data(), name=argument)
    def property_holds(data, name):
        args = {
            "input_dim": case.shape[0],
            "output_dim": case.shape[1],
            "nb_params_share": case.share,
        }
        args[name] = data.draw(bad_shares if name == "nb_params_share" else bad_dims)
        with raises((ValueError, TypeError), name), default_dtype(torch.float64):
            structurednets.create(case.structure, **args, **case.options)

    property_holds()
