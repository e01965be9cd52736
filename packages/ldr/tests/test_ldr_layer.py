import copy

import numpy as np
import pytest
import torch

import structurednets
from structurednets import BudgetTooSmallError
from structurednets.testing import default_dtype
from structurednets_ldr import (
    LDRLayer,
    bands_from_dense,
    bands_to_dense,
    cyclic_shift_bands,
    ldr_nb_weight_parameters,
    multiply,
    weight,
)
from structurednets_ldr.kernels.forms import chain_geometry
from structurednets_ldr.operators import transpose_bands
from structurednets_ldr.schedule import choose_schedule


@pytest.mark.parametrize(
    "out_dim, in_dim, nb_columns",
    [(20, 20, None), (24, 10, None), (10, 24, None), (26, 14, 26), (18, 32, 8), (17, 17, 30)],
)
def test_weight_is_the_sum_of_krylov_products(
    out_dim, in_dim, nb_columns, random_operators, reference_weight
):
    """W = sum_i K(A, g_i) K(B^T, h_i)^T with m = min(out, in) columns unless given; A, B
    random tridiagonal plus corners (not shifts)."""
    rank = 2
    A_bands, B_bands, G, H = random_operators(out_dim, in_dim, rank, seed=out_dim + in_dim)
    A, B = bands_to_dense(A_bands), bands_to_dense(B_bands)
    with default_dtype(torch.float64):
        layer = LDRLayer(
            in_dim,
            out_dim,
            1.0,
            operators=(A, B),
            generators=(G, H),
            krylov_columns=nb_columns,
        )
    m = min(out_dim, in_dim) if nb_columns is None else nb_columns
    assert layer.krylov_columns == m
    expected = reference_weight(A, B, G, H, m)
    scale = expected.abs().max()
    with torch.no_grad():
        torch.testing.assert_close(layer.to_dense(), expected, rtol=0, atol=1e-12 * scale)
        U = torch.randn(5, in_dim, dtype=torch.float64)
        torch.testing.assert_close(
            layer(U) - layer.bias, U @ expected.T, rtol=0, atol=1e-11 * scale
        )


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize(
    "out_dim, in_dim, nb_columns, chain_length",
    [(30, 30, 30, 4), (30, 30, 30, 7), (18, 25, 18, 5), (25, 18, 18, 1), (12, 12, 12, 12)],
)
def test_both_forms_and_their_gradients_match_the_reference(
    explicit, out_dim, in_dim, nb_columns, chain_length, random_operators, reference_weight
):
    """Explicit and factored evaluation, every chain length (including a cut last chain):
    values and gradients of all inputs against autograd through the dense reference."""
    rank = 3
    A_bands, B_bands, G, H = random_operators(out_dim, in_dim, rank, seed=7)
    U = torch.randn(6, in_dim, dtype=torch.float64)
    weights = torch.randn(6, out_dim, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (U, A_bands, B_bands, G, H)]
    reference = (
        inputs[0]
        @ reference_weight(
            bands_to_dense(inputs[1]), bands_to_dense(inputs[2]), inputs[3], inputs[4], nb_columns
        ).T
    )
    (reference * weights).sum().backward()
    ours = [t.clone().requires_grad_(True) for t in (U, A_bands, B_bands, G, H)]
    output = multiply(*ours, nb_columns, chain_length, explicit)
    (output * weights).sum().backward()
    torch.testing.assert_close(output, reference, rtol=1e-11, atol=1e-11)
    for name, mine, theirs in zip("U A B G H".split(), ours, inputs, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-10, msg=name)


def test_gradcheck_with_cut_chains_and_coarse_steps(random_operators):
    A_bands, B_bands, G, H = random_operators(9, 11, 2, seed=3)
    U = torch.randn(4, 11, dtype=torch.float64)
    chains = chain_geometry(9, 11, 9, 2)  # 5 chains, the last one cut
    assert chains.nb_chains == 5 and chains.last_chain_length == 1
    for explicit in (True, False):
        inputs = [t.clone().requires_grad_(True) for t in (U, A_bands, B_bands, G, H)]
        assert torch.autograd.gradcheck(
            lambda *args, explicit=explicit: multiply(*args, 9, 2, explicit), inputs
        )


def test_interleaved_forward_and_backward_passes():
    """A backward pass whose forward pass was followed by other forward passes (other
    layers, the same layer) uses its own saved intermediates."""
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        first = LDRLayer(40, 40, 0.5)
        second = LDRLayer(40, 40, 0.5)
    U = torch.randn(64, 40, dtype=torch.float64)
    expected = {}
    for name, layer in (("first", first), ("second", second)):  # one at a time
        (layer(U) - layer.bias).square().sum().backward()
        expected[name] = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
    loss_first = (first(U) - first.bias).square().sum()
    loss_second = (second(U) - second.bias).square().sum()
    with torch.no_grad():
        first(U)  # one more forward pass of the same layer
    loss_first.backward()  # not in reverse order of the forward passes
    loss_second.backward()
    for name, layer in (("first", first), ("second", second)):
        for got, want in zip((p.grad for p in layer.parameters()), expected[name], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    layer = copy.deepcopy(first)
    assert torch.equal(layer(U), first(U))


def test_random_layer_starts_from_cyclic_shifts():
    layer = LDRLayer(48, 32, 0.5)
    A, B = layer.operators
    n_out, n_in = 32, 48
    expected_A = torch.roll(torch.eye(n_out), 1, dims=0)  # Z_1: (A x)[i] = x[i - 1]
    expected_B = torch.roll(torch.eye(n_in), 1, dims=0)
    expected_B[0, -1] = -1.0  # Z_(-1) ...
    torch.testing.assert_close(A.detach(), expected_A)
    torch.testing.assert_close(B.detach(), expected_B.T)  # ... transposed
    assert layer.krylov_columns == 32
    assert layer.displacement_rank == 0.5 * 48 * 32 // 80 - 3


def test_parameter_count_and_default_rank():
    for input_dim, output_dim, share in [(512, 512, 0.1), (64, 48, 0.5), (100, 30, 0.9)]:
        layer = LDRLayer(input_dim, output_dim, share)
        r = layer.displacement_rank
        per_rank = input_dim + output_dim
        assert (r + 3) * per_rank <= share * input_dim * output_dim < (r + 4) * per_rank
        count = ldr_nb_weight_parameters(input_dim, output_dim, share)
        assert layer.nb_weight_parameters == count == (r + 3) * per_rank
        assert sorted(n for n, _ in layer.named_parameters()) == [
            "A_bands",
            "B_bands",
            "G",
            "H",
            "bias",
        ]
    assert structurednets.nb_parameters("ldr", 64, 48, 0.5, displacement_rank=2) == 5 * 112 + 48
    assert LDRLayer(512, 512, 0.0274).displacement_rank == 4
    assert LDRLayer(1024, 1024, 0.0215).displacement_rank == 8


def test_budget_errors_name_the_smallest_share():
    with pytest.raises(BudgetTooSmallError, match="displacement rank 1") as info:
        structurednets.create("ldr", 100, 100, 0.05)
    assert info.value.needed == 4 * 200
    assert LDRLayer(100, 100, info.value.min_share).displacement_rank == 1
    with pytest.raises(BudgetTooSmallError, match="displacement rank 9 .* needs 2400"):
        LDRLayer(100, 100, 0.2, displacement_rank=9)
    with pytest.raises(BudgetTooSmallError, match="no share does"):
        LDRLayer(9, 1, 1.0)


def test_option_errors_name_the_option():
    rng = np.random.default_rng(0)
    A = np.diag(np.ones(11), -1)
    A[0, 5] = 1.0
    with pytest.raises(ValueError, match=r"operators\[0\] \(A\) must be tridiagonal .* \[0, 5\]"):
        LDRLayer(12, 12, 1.0, operators=(A, np.eye(12)))
    with pytest.raises(ValueError, match=r"operators\[1\] \(B\) must have shape \(12, 12\)"):
        LDRLayer(12, 12, 1.0, operators=(np.eye(12), np.eye(11)))
    with pytest.raises(TypeError, match="operators must be a pair"):
        LDRLayer(12, 12, 1.0, operators=np.eye(12))
    G, H = rng.standard_normal((12, 2)), rng.standard_normal((12, 2))
    with pytest.raises(ValueError, match="either initial_weight_matrix or generators"):
        LDRLayer(12, 12, 1.0, initial_weight_matrix=np.eye(12), generators=(G, H))
    with pytest.raises(ValueError, match="displacement_rank=1 disagrees"):
        LDRLayer(12, 12, 1.0, displacement_rank=1, generators=(G, H))
    with pytest.raises(ValueError, match=r"generators\[1\] \(H\) must have shape \(12, 2\)"):
        LDRLayer(12, 12, 1.0, generators=(G, H[:, :1]))
    with pytest.raises(ValueError, match="krylov_columns must be a positive integer, got 0"):
        LDRLayer(12, 12, 1.0, krylov_columns=0)
    with pytest.raises(TypeError, match="displacement_rank must be a positive integer"):
        LDRLayer(12, 12, 1.0, displacement_rank=1.5)


def test_bands_round_trip_and_corners():
    matrix = np.zeros((5, 5))
    matrix[np.arange(5), np.arange(5)] = [1, 2, 3, 4, 5]
    matrix[np.arange(1, 5), np.arange(4)] = [6, 7, 8, 9]  # subdiagonal
    matrix[np.arange(4), np.arange(1, 5)] = [10, 11, 12, 13]  # superdiagonal
    matrix[0, 4], matrix[4, 0] = 14, 15  # corners
    bands = bands_from_dense("A", matrix, 5)
    assert bands[0].tolist() == [14, 6, 7, 8, 9]
    assert bands[2].tolist() == [10, 11, 12, 13, 15]
    assert torch.equal(bands_to_dense(bands), torch.from_numpy(matrix))
    assert torch.equal(bands_to_dense(transpose_bands(bands)), torch.from_numpy(matrix.T))
    for n in (1, 2, 3):  # small blocks: positions coincide, the dense matrix is exact
        small = np.arange(1.0, n * n + 1).reshape(n, n)
        assert torch.equal(bands_to_dense(bands_from_dense("A", small, n)), torch.from_numpy(small))
    shift = bands_to_dense(cyclic_shift_bands(4, 0.5))
    assert torch.equal(shift @ torch.arange(4.0), torch.tensor([1.5, 0.0, 1.0, 2.0]))


def test_cost_model_picks_the_form_by_batch_size(random_operators, reference_weight):
    assert choose_schedule(512, 512, 512, 4, 256)[0] is True  # explicit W for a large batch
    assert choose_schedule(512, 512, 512, 4, 4)[0] is False  # factored for a small one
    assert choose_schedule(64, 64, 64, 4, None)[0] is True  # to_dense
    A_bands, B_bands, G, H = random_operators(64, 48, 2, seed=1)
    U = torch.randn(3, 48, dtype=torch.float64)
    expected = U @ reference_weight(bands_to_dense(A_bands), bands_to_dense(B_bands), G, H, 48).T
    torch.testing.assert_close(multiply(U, A_bands, B_bands, G, H, 48, 5, False), expected)
    # without a schedule: the cost model's, for the product and for W alone
    torch.testing.assert_close(multiply(U, A_bands, B_bands, G, H, 48), expected)
    torch.testing.assert_close(U @ weight(A_bands, B_bands, G, H, 48).T, expected)


def test_adam_learns_an_ldr_teacher():
    """A student of the same structure, trained with Adam on input/output pairs of a
    Toeplitz-like teacher, gets close to it."""
    torch.manual_seed(0)
    i = torch.arange(32.0)
    teacher = 1.0 / (1.0 + (i[:, None] - i[None, :]).abs())
    X = torch.randn(512, 32)
    Y = X @ teacher.T
    student = LDRLayer(32, 32, 0.5, use_bias=False)
    optimiser = torch.optim.Adam(student.parameters(), lr=3e-3)
    initial = torch.nn.functional.mse_loss(student(X), Y).item()
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(student(X), Y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.02 * initial


def test_cached_inference_weight_follows_parameter_updates():
    torch.manual_seed(0)
    layer = LDRLayer(40, 30, 0.5, cache_weight=True)
    U = torch.randn(4, 40)
    with torch.no_grad():
        first = layer(U)
        torch.testing.assert_close(first, U @ layer.to_dense().T + layer.bias)
        assert layer._cached is not None
        layer.G.mul_(2.0)  # in-place update: a new version, so a new W
        torch.testing.assert_close(layer(U), U @ layer.to_dense().T + layer.bias)
    optimiser = torch.optim.SGD(layer.parameters(), lr=1e-4)
    layer(U).square().mean().backward()  # with gradients: the cache is not used
    optimiser.step()
    assert torch.isfinite(layer.to_dense()).all()
    with torch.no_grad():
        torch.testing.assert_close(layer(U), U @ layer.to_dense().T + layer.bias)
    clone = copy.deepcopy(layer)
    assert clone._cached is None  # the built W is not part of the layer's state
    with torch.no_grad():
        assert torch.equal(clone(U), layer(U))
        assert clone._cached is not None
    double = copy.deepcopy(layer).double()
    with torch.no_grad():
        assert double(U.double()).dtype == torch.float64


def test_layout_holds_the_displacement_rank_and_the_krylov_columns():
    """The layout rebuilds a layer of the same shapes (also with non-default Krylov columns
    and a displacement rank below the budget's), and its state dict gives the same W."""
    torch.manual_seed(0)
    layer = LDRLayer(40, 30, 0.5, displacement_rank=2, krylov_columns=12)
    assert layer.layout.sizes == {"displacement_rank": 2, "krylov_columns": 12}
    twin = structurednets.create("ldr", layout=layer.layout)
    assert (twin.displacement_rank, twin.krylov_columns) == (2, 12)
    assert structurednets.nb_parameters("ldr", layout=layer.layout) == 5 * 70 + 30
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(twin.to_dense(), layer.to_dense())
    default = LDRLayer(40, 30, 0.5)  # random init: the budget's rank, min(in, out) columns
    assert default.layout.sizes == {"displacement_rank": 5, "krylov_columns": 30}  # 600 // 70 - 3


def test_autocast_runs_the_recursions_in_float32():
    # The Krylov/Horner recursions keep the parameters' dtype (autocast_full_precision);
    # rounding every step to bfloat16 instead costs several times nn.Linear's error.
    torch.manual_seed(0)
    layer = LDRLayer(512, 384, 0.5)
    rounded = copy.deepcopy(layer)
    rounded.autocast_full_precision = ()
    U = torch.randn(8, 512, generator=torch.Generator().manual_seed(1))
    dense = torch.nn.Linear(512, 384)
    with torch.no_grad():
        reference = copy.deepcopy(layer).double()(U.double())
        dense.weight.copy_(layer.to_dense())
        dense.bias.copy_(layer.bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            Y, Y_rounded, Y_dense = layer(U), rounded(U), dense(U)

    def error(Y):
        return float((Y.double() - reference).norm() / reference.norm())

    assert Y.dtype == Y_rounded.dtype == torch.bfloat16
    assert error(Y) < 1.3 * error(Y_dense)
    assert error(Y_rounded) > 2 * error(Y_dense)
