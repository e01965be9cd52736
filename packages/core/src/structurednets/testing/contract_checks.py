"""Checks of the layer contract: shapes, budget, counts, gradients, training, saving, errors."""

from __future__ import annotations

import copy
import doctest
import inspect
import io
import math
import pickle

import numpy as np
import torch

import structurednets
from structurednets.layers.layer_helpers import get_nb_model_parameters
from structurednets.layers.structured_layer import StructuredLayer, dense_init_std
from structurednets.testing.case import (
    ConformanceCase,
    assert_same_outputs,
    default_dtype,
    inputs,
    raises,
    relative_error,
)
from structurednets.validation import BudgetTooSmallError, weight_budget


def check_registered(case: ConformanceCase) -> None:
    """The structure is installed, ``create`` builds its class, aliases resolve to it."""
    structure = structurednets.get_structure(case.structure)
    assert structure.name in structurednets.available()
    layer = case.build()
    assert isinstance(layer, StructuredLayer)
    assert type(layer) is structure.layer_class
    for alias in structure.aliases:
        assert structurednets.get_structure(alias) is structure


def check_constructor_signature(case: ConformanceCase) -> None:
    """The constructor is the one every structure shares (that of MatthiasKi/structurednets 1.0),
    with structure options keyword-only."""
    layer_class = structurednets.get_structure(case.structure).layer_class
    parameters = list(inspect.signature(layer_class.__init__).parameters.values())[1:]
    expected = [
        ("input_dim", inspect.Parameter.empty),
        ("output_dim", inspect.Parameter.empty),
        ("nb_params_share", inspect.Parameter.empty),
        ("use_bias", True),
        ("initial_weight_matrix", None),
        ("initial_bias", None),
    ]
    got = [(p.name, p.default) for p in parameters[: len(expected)]]
    assert got == expected, f"constructor should start with {expected}, got {got}"
    for parameter in parameters[len(expected) :]:
        assert parameter.kind in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.VAR_KEYWORD,
        ), f"structure option {parameter.name!r} must be keyword-only"


def check_output_shapes(case: ConformanceCase) -> None:
    """``(batch, in)``, ``(in,)`` and ``(a, b, in)`` inputs give matching output shapes."""
    layer = case.build()
    out = layer.output_dim
    U = inputs(layer, 2, 3)
    with torch.no_grad():
        assert layer(U[0]).shape == (3, out)
        assert layer(U[0, 0]).shape == (out,)
        assert layer(U).shape == (2, 3, out)
        torch.testing.assert_close(layer(U)[1, 2], layer(U[1, 2]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(U).reshape(6, out), layer(U.reshape(6, -1)))


def check_forward_matches_dense(case: ConformanceCase) -> None:
    """``forward(U) == U @ to_dense().T + bias`` (float64) on every grid shape that builds."""
    checked = 0
    for input_dim, output_dim in (case.shape, *case.shapes):
        try:
            layer = case.build(input_dim, output_dim, 1.0 if 1 in (input_dim, output_dim) else None)
        except BudgetTooSmallError:
            continue
        U = inputs(layer, 6)
        with torch.no_grad():
            dense = layer.to_dense()
            assert dense.shape == (output_dim, input_dim), (
                f"to_dense() should have shape {(output_dim, input_dim)}, got {tuple(dense.shape)}"
            )
            expected = U @ dense.T + layer.bias
            torch.testing.assert_close(layer(U), expected, rtol=1e-9, atol=1e-10)
        checked += 1
    assert checked, "no layer of the grid could be built"


def check_budget_and_parameter_counts(case: ConformanceCase) -> None:
    """Budget respected; ``get_nb_parameters() == get_nb_model_parameters() == nb_parameters()``.

    A share too small for a shape must raise :class:`BudgetTooSmallError` (from both
    ``create`` and ``nb_parameters``) naming a smallest share that does build.
    """
    for input_dim, output_dim in case.shapes:
        for share in case.shares:
            for use_bias in (True, False):
                args = (case.structure, input_dim, output_dim, share)
                try:
                    predicted = structurednets.nb_parameters(
                        *args, use_bias=use_bias, **case.options
                    )
                except BudgetTooSmallError as error:
                    with raises(BudgetTooSmallError, "nb_params_share"):
                        case.build(input_dim, output_dim, share, use_bias=use_bias)
                    assert error.min_share > share, (
                        f"{args}: min_share {error.min_share} is not above the share that failed"
                    )
                    if error.min_share <= 1.0:
                        assert f"{error.min_share:g}" in str(error), str(error)
                        layer = case.build(
                            input_dim, output_dim, error.min_share, use_bias=use_bias
                        )
                        assert layer.nb_weight_parameters <= weight_budget(
                            input_dim, output_dim, error.min_share
                        )
                    continue
                layer = case.build(input_dim, output_dim, share, use_bias=use_bias)
                counted = layer.get_nb_parameters()
                assert counted == get_nb_model_parameters(layer) == predicted, (
                    f"{args} use_bias={use_bias}: get_nb_parameters()={counted}, "
                    f"get_nb_model_parameters={get_nb_model_parameters(layer)}, "
                    f"nb_parameters()={predicted}"
                )
                budget = weight_budget(input_dim, output_dim, share)
                assert 0 < layer.nb_weight_parameters <= budget, (
                    f"{args}: {layer.nb_weight_parameters} weight parameters, budget {budget}"
                )
                assert counted - layer.nb_weight_parameters == (output_dim if use_bias else 0)


def check_gradients(case: ConformanceCase) -> None:
    """``torch.autograd.gradcheck`` (float64) for the input and every parameter; every
    parameter gets a gradient, through ``forward`` and through ``to_dense``."""
    input_dim, output_dim = case.gradcheck_shape
    layer = case.build(input_dim, output_dim, case.gradcheck_share)
    names = [name for name, _ in layer.named_parameters()]
    values = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    U = inputs(layer, 3).requires_grad_(True)

    def function(U: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (U,))

    assert torch.autograd.gradcheck(function, (U, *values), eps=1e-6, atol=1e-6, rtol=1e-4)
    layer.zero_grad()
    (layer(inputs(layer, 4)) ** 2).sum().backward()
    no_gradient = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_gradient, f"parameters without gradient through forward: {no_gradient}"
    layer.zero_grad()
    (layer.to_dense() ** 2).sum().backward()
    no_gradient = [
        n
        for n, p in layer.named_parameters()
        if n != "bias" and (p.grad is None or not p.grad.any())
    ]
    assert not no_gradient, f"parameters without gradient through to_dense: {no_gradient}"


def check_optimisers_reduce_loss(case: ConformanceCase) -> None:
    """A few Adam and SGD steps (float32) reduce the error to a teacher of the same structure."""
    optimisers = {
        "Adam": lambda params: torch.optim.Adam(params, lr=case.adam_lr),
        "SGD": lambda params: torch.optim.SGD(params, lr=case.sgd_lr),
    }
    for name, make_optimiser in optimisers.items():
        teacher = case.build(seed=1, dtype=torch.float32)
        student = case.build(seed=2, dtype=torch.float32)
        X = inputs(student, 256, seed=3)
        with torch.no_grad():
            Y = teacher(X)
        optimiser = make_optimiser(student.parameters())
        losses = []
        for _ in range(case.nb_train_steps):
            loss = torch.nn.functional.mse_loss(student(X), Y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        with torch.no_grad():
            final = torch.nn.functional.mse_loss(student(X), Y).item()
        assert math.isfinite(final) and final < 0.9 * losses[0], (
            f"{name}: loss went from {losses[0]:.4g} to {final:.4g} in {case.nb_train_steps} steps"
        )


def check_state_dict_round_trip(case: ConformanceCase) -> None:
    """A state dict loaded into a freshly created layer (other seed) reproduces the outputs."""
    original = case.build(seed=0)
    fresh = case.build(seed=1)
    fresh.load_state_dict(original.state_dict())
    assert_same_outputs(original, fresh, "load_state_dict into a fresh layer")


def check_copy_and_serialisation(case: ConformanceCase) -> None:
    """``deepcopy``, ``pickle`` and ``torch.save``/``torch.load`` give identical layers."""
    layer = case.build()
    assert_same_outputs(layer, copy.deepcopy(layer), "deepcopy")
    assert_same_outputs(layer, pickle.loads(pickle.dumps(layer)), "pickle")
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert_same_outputs(layer, torch.load(buffer, weights_only=False), "torch.save/torch.load")


def check_dtype_conversion(case: ConformanceCase) -> None:
    """``.to(torch.float64)`` converts every floating tensor; results agree with float32."""
    layer32 = case.build(dtype=torch.float32)
    layer64 = copy.deepcopy(layer32).to(torch.float64)
    for name, tensor in [*layer64.named_parameters(), *layer64.named_buffers()]:
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float64, f"{name} stayed {tensor.dtype} after .to(float64)"
    U = inputs(layer64, 4)
    with torch.no_grad():
        Y64 = layer64(U)
        Y32 = layer32(U.float())
    assert Y64.dtype == torch.float64 and Y32.dtype == torch.float32
    torch.testing.assert_close(Y32.double(), Y64, rtol=1e-4, atol=1e-5)


def check_no_bias(case: ConformanceCase) -> None:
    """``use_bias=False``: no bias parameter, zero input gives zero output."""
    layer = case.build(use_bias=False)
    assert layer.bias is None
    assert "bias" not in dict(layer.named_parameters())
    with torch.no_grad():
        assert not layer(torch.zeros(3, layer.input_dim, dtype=torch.float64)).any()


def check_initial_bias(case: ConformanceCase) -> None:
    """``initial_bias`` (numpy or tensor) becomes the bias."""
    input_dim, output_dim = case.shape
    bias = np.random.default_rng(0).standard_normal(output_dim)
    for given in (bias, torch.from_numpy(bias)):
        layer = case.build(initial_bias=given)
        with torch.no_grad():
            zeros = torch.zeros(2, input_dim, dtype=torch.float64)
            torch.testing.assert_close(layer(zeros), torch.from_numpy(bias).expand(2, -1))


def check_initial_weight_matrix(case: ConformanceCase) -> None:
    """A layer fitted to ``initial_weight_matrix`` is closer to it than a random layer and
    than zero, within budget (for noise and for a smooth kernel), and the same for numpy
    and tensor input under one seed."""
    input_dim, output_dim = case.shape
    target = np.random.default_rng(0).standard_normal((output_dim, input_dim))
    fitted = case.build(initial_weight_matrix=target)
    fitted_again = case.build(initial_weight_matrix=torch.from_numpy(target))
    target_t = torch.from_numpy(target)
    with torch.no_grad():
        error = relative_error(fitted.to_dense(), target_t)
        random_error = relative_error(case.build(seed=5).to_dense(), target_t)
        torch.testing.assert_close(fitted.to_dense(), fitted_again.to_dense())
    assert error < 0.99, f"fitted layer's relative error {error:.3f} is no better than zero"
    assert error < random_error, f"fitted error {error:.3f} >= random layer's {random_error:.3f}"
    assert fitted.nb_weight_parameters <= fitted.weight_budget
    assert fitted.get_nb_parameters() == get_nb_model_parameters(fitted)
    # A smooth kernel takes other paths through a fitter than noise (structure is found).
    rows, cols = np.linspace(0, 1, output_dim), np.linspace(0, 1, input_dim)
    kernel = 1.0 / (1.0 + 20.0 * np.abs(rows[:, None] - cols[None, :]))
    fitted = case.build(initial_weight_matrix=kernel)
    assert fitted.nb_weight_parameters <= fitted.weight_budget, (
        f"the layer fitted to a smooth kernel holds {fitted.nb_weight_parameters} weight "
        f"parameters, over the budget of {fitted.weight_budget}"
    )


def check_random_init_scale(case: ConformanceCase) -> None:
    """A random layer's ``W`` has entries of ``nn.Linear``'s scale (within a factor 3)."""
    input_dim, output_dim = 64, 48
    expected = dense_init_std(input_dim)
    stds = []
    for seed in range(3):
        with torch.no_grad():
            dense = case.build(input_dim, output_dim, seed=seed).to_dense()
        stds.append(float(dense.std()))
    std = float(np.mean(stds))
    assert expected / 3 <= std <= expected * 3, (
        f"random W entries have std {std:.4g}; nn.Linear's have {expected:.4g}"
    )


def check_bad_constructor_arguments(case: ConformanceCase) -> None:
    """Bad dims, shares, weight matrices and biases raise errors that name the argument."""
    input_dim, output_dim = case.shape
    target = np.random.default_rng(0).standard_normal((output_dim, input_dim))
    with_nan, with_inf = target.copy(), target.copy()
    with_nan[0, 0], with_inf[-1, -1] = np.nan, np.inf
    bad = [
        (dict(input_dim=0), ValueError, "input_dim", "0"),
        (dict(input_dim=-4), ValueError, "input_dim", "-4"),
        (dict(input_dim=2.5), TypeError, "input_dim", "2.5"),
        (dict(input_dim="16"), TypeError, "input_dim", "'16'"),
        (dict(output_dim=0), ValueError, "output_dim", "0"),
        (dict(output_dim=None), TypeError, "output_dim", "None"),
        (dict(nb_params_share=0.0), ValueError, "nb_params_share", "0.0"),
        (dict(nb_params_share=-0.5), ValueError, "nb_params_share", "-0.5"),
        (dict(nb_params_share=1.5), ValueError, "nb_params_share", "1.5"),
        (dict(nb_params_share=float("nan")), ValueError, "nb_params_share", "nan"),
        (dict(nb_params_share="0.5"), TypeError, "nb_params_share", "'0.5'"),
        (
            dict(initial_weight_matrix=target.T),
            ValueError,
            "initial_weight_matrix",
            str(target.T.shape),
        ),
        (
            dict(initial_weight_matrix=target[0]),
            ValueError,
            "initial_weight_matrix",
            str(target[0].shape),
        ),
        (dict(initial_weight_matrix=with_nan), ValueError, "initial_weight_matrix", "NaN"),
        (dict(initial_weight_matrix=with_inf), ValueError, "initial_weight_matrix", "infinite"),
        (dict(initial_weight_matrix=target.tolist()), TypeError, "initial_weight_matrix", "list"),
        (
            dict(initial_bias=np.zeros(output_dim + 1)),
            ValueError,
            "initial_bias",
            f"({output_dim + 1},)",
        ),
        (dict(initial_bias=np.full(output_dim, np.nan)), ValueError, "initial_bias", "NaN"),
        (dict(use_bias=False, initial_bias=np.zeros(output_dim)), ValueError, "initial_bias"),
        (dict(not_an_option=1), TypeError, "not_an_option"),
    ]
    for overrides, exception, *fragments in bad:
        args = {"input_dim": input_dim, "output_dim": output_dim, "nb_params_share": case.share}
        kwargs = {k: v for k, v in overrides.items() if k not in args}
        args.update({k: v for k, v in overrides.items() if k in args})
        with raises(exception, *fragments), default_dtype(torch.float64):
            structurednets.create(case.structure, **args, **{**case.options, **kwargs})


def check_bad_inputs(case: ConformanceCase) -> None:
    """Wrong width, non-floating, mismatched dtype or non-tensor inputs raise clear errors."""
    layer = case.build(dtype=torch.float32)
    width = layer.input_dim
    with raises(ValueError, "input", str(width), str((4, width + 1))):
        layer(torch.randn(4, width + 1))
    with raises(ValueError, "input"):
        layer(torch.tensor(1.0))
    with raises(TypeError, "input", "torch.int64"):
        layer(torch.ones(4, width, dtype=torch.int64))
    with raises(TypeError, "input", "torch.float16", "torch.float32"):
        layer(torch.randn(4, width).half())
    with raises(TypeError, "input", "list"):
        layer([[0.0] * width])


def check_repr(case: ConformanceCase) -> None:
    """``repr`` shows the sizes and the parameter count."""
    layer = case.build()
    text = repr(layer)
    for fragment in (
        f"input_dim={layer.input_dim}",
        f"output_dim={layer.output_dim}",
        f"nb_parameters={layer.get_nb_parameters()}",
    ):
        assert fragment in text, f"{fragment!r} missing from repr: {text}"


def check_docstring_example(case: ConformanceCase) -> None:
    """The layer class's docstring has ``Args:``, ``Shape:``, ``Attributes:`` and ``Example:``
    sections, like ``nn.Linear``'s, and its example runs as a doctest."""
    layer_class = structurednets.get_structure(case.structure).layer_class
    docstring = inspect.getdoc(layer_class) or ""
    missing = [
        section
        for section in ("Args:", "Shape:", "Attributes:", "Example")
        if section not in docstring
    ]
    assert not missing, f"{layer_class.__name__}'s docstring lacks the sections {missing}"
    finder = doctest.DocTestFinder(recurse=False)
    globs = {"torch": torch, "structurednets": structurednets, layer_class.__name__: layer_class}
    tests = finder.find(layer_class, layer_class.__name__, globs=globs)
    assert tests and tests[0].examples, f"{layer_class.__name__}'s Example has no >>> lines"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output = io.StringIO()
    torch.manual_seed(0)
    with default_dtype(torch.float32):
        for test in tests:
            runner.run(test, out=output.write)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{layer_class.__name__}'s Example fails:\n{output.getvalue()}"
