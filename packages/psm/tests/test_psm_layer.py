import copy
import io
import math

import numpy as np
import pytest
import scipy.sparse
import torch

import structurednets
from structurednets import BudgetTooSmallError
from structurednets.testing import default_dtype
from structurednets_psm import (
    PALMSettings,
    PSMLayer,
    factor_shapes,
    layer_sizes,
    psm_nb_weight_parameters,
)
from structurednets_psm.factors import random_support
from structurednets_psm.kernels import csr_matmul, sampled_product
from structurednets_psm.layout import split_nonzeros

SHORT = PALMSettings(max_sweeps=200)


def dense_product(layer):
    product = None
    for factor in layer.factors:
        dense = factor.to_dense().detach().double()
        product = dense if product is None else product @ dense
    return product


# -- sizes and counts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, share, nb_matrices, inner_dim",
    [
        ((64, 48), 0.3, 2, None),
        ((48, 64), 0.3, 3, None),
        ((33, 17), 0.9, 2, 25),
        ((40, 40), 0.2, 4, 20),
    ],
)
def test_sizes_use_whole_budget_and_match_layer(shape, share, nb_matrices, inner_dim):
    input_dim, output_dim = shape
    sizes = layer_sizes(input_dim, output_dim, share, nb_matrices=nb_matrices, inner_dim=inner_dim)
    budget = math.floor(share * input_dim * output_dim * (1 + 1e-12))
    assert sizes.total_nonzeros == budget
    layer = PSMLayer(input_dim, output_dim, share, nb_matrices=nb_matrices, inner_dim=inner_dim)
    assert [(f.rows, f.cols) for f in layer.factors] == list(sizes.shapes)
    assert [f.nnz for f in layer.factors] == list(sizes.nonzeros)
    assert layer.nb_weight_parameters == psm_nb_weight_parameters(
        input_dim, output_dim, share, nb_matrices=nb_matrices, inner_dim=inner_dim
    )


def test_split_nonzeros_follows_weights_within_bounds():
    shapes = factor_shapes(100, 100, 3)
    assert split_nonzeros(3000, shapes, (1, 1, 1)) == (1000, 1000, 1000)
    assert split_nonzeros(3500, shapes, (4, 2, 1)) == (2000, 1000, 500)
    # the smallest factor is raised to its minimum (100 = max(rows, cols)) and the rest shared
    assert split_nonzeros(1000, shapes, (10, 1, 1)) == (800, 100, 100)
    # more than fits: every factor full
    assert split_nonzeros(40000, shapes, None) == (10000, 10000, 10000)
    with pytest.raises(ValueError, match="cannot cover"):
        split_nonzeros(299, shapes)


def test_budget_error_names_smallest_share():
    with pytest.raises(BudgetTooSmallError) as info:
        PSMLayer(100, 100, 0.01)
    assert info.value.needed == 200 and info.value.min_share == 0.02
    assert "use nb_params_share >= 0.02" in str(info.value)
    assert PSMLayer(100, 100, info.value.min_share).nb_weight_parameters == 200
    # a 1 x n layer cannot hold two factors covering every row and column...
    with pytest.raises(BudgetTooSmallError, match="no share does"):
        PSMLayer(9, 1, 1.0)
    # ...but one factor (a plain sparse matrix) fits
    assert PSMLayer(9, 1, 1.0, nb_matrices=1).nb_weight_parameters == 9


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match="nb_matrices must be a positive integer, got 0"):
        PSMLayer(16, 16, 0.5, nb_matrices=0)
    with pytest.raises(TypeError, match="inner_dim must be a positive integer"):
        PSMLayer(16, 16, 0.5, inner_dim=2.5)
    with pytest.raises(
        ValueError, match=r"nnz_split must have one weight per factor \(nb_matrices=2\)"
    ):
        PSMLayer(16, 16, 0.5, nnz_split=(1, 2, 3))
    with pytest.raises(ValueError, match="positive finite"):
        PSMLayer(16, 16, 0.5, nnz_split=(1, -1))
    with pytest.raises(TypeError, match="nnz_split must be a sequence"):
        PSMLayer(16, 16, 0.5, nnz_split=0.5)
    with pytest.raises(TypeError, match="seed must be a non-negative integer"):
        PSMLayer(16, 16, 0.5, seed=-1)
    with pytest.raises(ValueError, match="either initial_weight_matrix or factors"):
        PSMLayer(4, 4, 1.0, initial_weight_matrix=np.eye(4), factors=[np.eye(4)])


# -- random initialisation -------------------------------------------------------------


@pytest.mark.parametrize("rows, cols, nnz", [(50, 30, 50), (30, 50, 60), (40, 40, 800), (7, 3, 21)])
def test_random_support_is_distinct_and_covers_rows_and_columns(rows, cols, nnz):
    row_indices, col_indices = random_support(rows, cols, nnz, torch.Generator().manual_seed(0))
    positions = row_indices * cols + col_indices
    assert positions.unique().numel() == nnz
    assert torch.bincount(row_indices, minlength=rows).min() >= 1
    assert torch.bincount(col_indices, minlength=cols).min() >= 1


def test_random_layer_product_has_no_empty_row_or_column_and_linear_scale():
    stds = []
    for seed in range(4):
        torch.manual_seed(seed)
        layer = PSMLayer(256, 192, 0.1, nb_matrices=3)
        support_product = None
        for factor in layer.factors:
            support = (factor.to_dense().detach() != 0).double()
            assert support.sum(1).min() >= 1 and support.sum(0).min() >= 1
            support_product = support if support_product is None else support_product @ support
        assert support_product.sum(1).min() > 0 and support_product.sum(0).min() > 0
        stds.append(float(dense_product(layer).std()))
    expected = 1 / math.sqrt(3 * 256)  # nn.Linear's U(-1/sqrt(in), 1/sqrt(in))
    assert abs(np.mean(stds) / expected - 1) < 0.15


# -- kernels ---------------------------------------------------------------------------


def test_kernels_match_dense_and_gradcheck():
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        layer = PSMLayer(9, 7, 0.9, nb_matrices=1, use_bias=False)
    factor = layer.factors[0]
    dense_factor = factor.to_dense().detach()
    Z = torch.randn(9, 5, dtype=torch.float64)
    torch.testing.assert_close(factor.matmul(Z), dense_factor @ Z)
    G = torch.randn(7, 5, dtype=torch.float64)
    expected = (G @ Z.T)[factor.row_indices(), factor.col_indices]
    torch.testing.assert_close(
        sampled_product(factor.crow_indices, factor.col_indices, G, Z), expected
    )

    def function(values, dense):
        return csr_matmul(
            values,
            factor.crow_indices,
            factor.col_indices,
            factor.transpose_perm,
            factor.transpose_crow_indices,
            factor.transpose_col_indices,
            dense,
            factor.rows,
        )

    values = factor.values.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(function, (values, Z.clone().requires_grad_(True)))


def test_large_operands_match_dense():
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        layer = PSMLayer(1000, 900, 0.01, nb_matrices=1, use_bias=False)
    U = torch.randn(200, 1000, dtype=torch.float64, requires_grad=True)
    dense = layer.to_dense().detach()
    output = layer(U)
    torch.testing.assert_close(output, U @ dense.T)
    output.sum().backward()
    torch.testing.assert_close(U.grad, torch.ones(200, 900, dtype=torch.float64) @ dense)


def test_values_gradient_is_sampled_dense_gradient():
    torch.manual_seed(1)
    layer = PSMLayer(40, 30, 0.3, nb_matrices=2)
    U = torch.randn(16, 40)
    layer(U).square().sum().backward()
    reference = [f.to_dense().detach().requires_grad_(True) for f in layer.factors]
    Y = U @ (reference[0] @ reference[1]).T + layer.bias.detach()
    Y.square().sum().backward()
    for factor, dense in zip(layer.factors, reference, strict=True):
        expected = dense.grad[factor.row_indices(), factor.col_indices]
        torch.testing.assert_close(factor.values.grad, expected, rtol=1e-4, atol=1e-5)


# -- explicit factors ------------------------------------------------------------------


def test_explicit_factors_from_scipy_torch_and_pairs():
    rng = np.random.default_rng(0)
    first = scipy.sparse.random(12, 8, density=0.5, random_state=rng, format="csr")
    second = scipy.sparse.random(8, 10, density=0.5, random_state=rng, format="coo")
    expected = (first @ second).toarray()
    second_coo = second.tocoo()
    as_pair = (np.vstack([second_coo.row, second_coo.col]), second_coo.data)
    as_torch = torch.sparse_coo_tensor(
        np.vstack([first.tocoo().row, first.tocoo().col]),
        first.tocoo().data,
        (12, 8),
        check_invariants=True,
    )
    for factors in ([first, second], [as_torch, as_pair]):
        with default_dtype(torch.float64):
            layer = PSMLayer(10, 12, 1.0, factors=factors, inner_dim=8)
        np.testing.assert_allclose(layer.to_dense().detach().numpy(), expected, rtol=1e-12)
        assert layer.nb_weight_parameters == first.nnz + second.nnz
        assert layer.nb_weight_parameters == structurednets.nb_parameters(
            "psm", 10, 12, 1.0, use_bias=False, factors=factors, inner_dim=8
        )
    with pytest.raises(ValueError, match=r"factors\[1\] must have 8 rows to chain"):
        PSMLayer(10, 12, 1.0, factors=[first, second.T])
    with pytest.raises(ValueError, match="input_dim=11 columns"):
        PSMLayer(11, 12, 1.0, factors=[first, second])
    with pytest.raises(BudgetTooSmallError, match="the given factors"):
        PSMLayer(10, 12, 0.1, factors=[first, second])
    with pytest.raises(TypeError, match="scipy sparse matrix"):
        PSMLayer(10, 12, 1.0, factors=[first.toarray(), second])


# -- layouts ---------------------------------------------------------------------------


def test_layout_holds_factor_shapes_nonzeros_and_block_size():
    target = np.random.default_rng(3).standard_normal((24, 36))
    fitted = PSMLayer(
        36, 24, 0.4, initial_weight_matrix=target, nb_matrices=3, inner_dim=12,
        nnz_split=(4, 1, 1), palm_settings=SHORT,
    )  # fmt: skip
    sizes = fitted.layout.sizes
    assert [list(shape) for shape in sizes["factor_shapes"]] == [[24, 12], [12, 12], [12, 36]]
    assert list(sizes["nonzeros"]) == [f.nnz for f in fitted.factors]
    assert sum(sizes["nonzeros"]) == fitted.weight_budget and sizes["block_size"] == 1
    twin = structurednets.create("psm", layout=fitted.layout)
    assert twin.layout == fitted.layout
    twin.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(twin.to_dense(), fitted.to_dense(), rtol=0, atol=0)
    # the support indices are persistent buffers: they travel in the state dict
    keys = set(fitted.state_dict())
    assert {"factors.0.crow_indices", "factors.0.col_indices", "factors.2.transpose_perm"} <= keys


def test_layout_of_given_factors_with_empty_rows_rebuilds():
    # a factor with fewer values than rows: the random layer of that layout cannot cover
    # every row either, and must still have exactly its tensors
    first = scipy.sparse.random(10, 6, density=0.1, random_state=0, format="csr")
    second = scipy.sparse.random(6, 8, density=0.6, random_state=1, format="csr")
    given = PSMLayer(8, 10, 1.0, factors=[first, second])
    assert list(given.layout.sizes["nonzeros"]) == [first.nnz, second.nnz] and first.nnz < 10
    twin = structurednets.create("psm", layout=given.layout)
    twin.load_state_dict(given.state_dict())
    U = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(twin(U), given(U))
    expected = first.nnz + second.nnz
    assert (
        structurednets.nb_parameters(
            "psm",
            layout=given.layout,
        )
        == expected + 10
    )


def test_fit_with_fixed_nonzeros_keeps_them():
    target = np.random.default_rng(4).standard_normal((20, 20))
    layer = PSMLayer(
        20, 20, 0.5, initial_weight_matrix=target, nonzeros=[120, 40], palm_settings=SHORT
    )
    assert [f.nnz for f in layer.factors] == [120, 40]
    assert all(strategy.nonzeros == (120, 40) for strategy, _ in layer.fit.tried)
    # better than one sparse matrix keeping the 120 largest entries (0.455; the fit: 0.346)
    magnitudes = np.sort(np.abs(target).ravel())
    top_k = np.sqrt((magnitudes[:-120] ** 2).sum() / (magnitudes**2).sum())
    dense = layer.to_dense().detach().double().numpy()
    assert np.linalg.norm(dense - target) / np.linalg.norm(target) < top_k


def test_size_option_errors_name_the_option():
    with pytest.raises(ValueError, match=r"factor_shapes\[1\] must have 9 rows to chain"):
        PSMLayer(12, 10, 0.5, factor_shapes=[[10, 9], [8, 12]])
    with pytest.raises(ValueError, match=r"factor_shapes\[-1\] must have input_dim=12 columns"):
        PSMLayer(12, 10, 0.5, factor_shapes=[[10, 9], [9, 11]])
    with pytest.raises(ValueError, match="either factor_shapes or inner_dim"):
        PSMLayer(12, 10, 0.5, factor_shapes=[[10, 12]], inner_dim=4)
    with pytest.raises(ValueError, match="nb_matrices=2 does not match the 1 factor_shapes"):
        PSMLayer(12, 10, 0.5, factor_shapes=[[10, 12]], nb_matrices=2)
    with pytest.raises(TypeError, match=r"factor_shapes\[0\]\[1\] must be a positive integer"):
        PSMLayer(12, 10, 0.5, factor_shapes=[[10, 1.5]])
    with pytest.raises(ValueError, match=r"nonzeros must have one count per factor \(2 factors"):
        PSMLayer(12, 10, 0.5, nonzeros=[30])
    with pytest.raises(ValueError, match=r"nonzeros\[1\] must be between 0 and 120"):
        PSMLayer(12, 10, 1.0, nonzeros=[30, 121])
    with pytest.raises(ValueError, match=r"nonzeros\[0\] must be a multiple of block_size\*\*2=4"):
        PSMLayer(12, 10, 1.0, nonzeros=[30, 40], block_size=2, inner_dim=10)
    with pytest.raises(ValueError, match="either nonzeros .* or nnz_split"):
        PSMLayer(12, 10, 1.0, nonzeros=[30, 40], nnz_split=[1, 2])
    with pytest.raises(BudgetTooSmallError, match="the given nonzeros needs 70"):
        PSMLayer(12, 10, 0.5, nonzeros=[30, 40])
    with pytest.raises(ValueError, match="nonzeros=.* cannot be combined with factors"):
        PSMLayer(4, 4, 1.0, factors=[torch.eye(4).to_sparse()], nonzeros=[4])
    with pytest.raises(ValueError, match="nb_matrices=2 does not match the 1 given factors"):
        PSMLayer(4, 4, 1.0, factors=[torch.eye(4).to_sparse()], nb_matrices=2)


# -- training and the ecosystem --------------------------------------------------------


@pytest.mark.parametrize(
    "make_optimiser",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-4),
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    ],
    ids=["Adam", "AdamW", "SGD"],
)
def test_optimisers_learn_a_teacher_with_the_same_supports(make_optimiser):
    torch.manual_seed(0)
    teacher = PSMLayer(32, 24, 0.3, use_bias=False)
    factors = [
        (torch.stack([f.row_indices(), f.col_indices]), torch.randn(f.nnz) * f.values.std())
        for f in teacher.factors
    ]
    student = PSMLayer(32, 24, 0.3, use_bias=False, factors=factors)
    X = torch.randn(512, 32)
    with torch.no_grad():
        Y = teacher(X)
    optimiser = make_optimiser(student.parameters())
    losses = []
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(student(X), Y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.02 * losses[0]


def test_state_dict_carries_supports_between_fitted_layers():
    rng = np.random.default_rng(0)
    target = rng.standard_normal((20, 30))
    fitted = PSMLayer(30, 20, 0.4, initial_weight_matrix=target, palm_settings=SHORT)
    assert fitted.nb_weight_parameters == fitted.weight_budget
    # a random layer with the fitted nonzeros has the same parameter shapes
    fresh = PSMLayer(30, 20, 0.4, nonzeros=[f.nnz for f in fitted.factors])
    fresh.load_state_dict(fitted.state_dict())
    U = torch.randn(5, 30)
    with torch.no_grad():
        torch.testing.assert_close(fresh(U), fitted(U))
    # every tensor is dense, so the state dict saves and loads with weights_only=True
    tensors = [t for t in fitted.state_dict().values() if isinstance(t, torch.Tensor)]
    assert tensors and not any(t.layout != torch.strided for t in tensors)
    buffer = io.BytesIO()
    torch.save(fitted.state_dict(), buffer)
    buffer.seek(0)
    reloaded = structurednets.create("psm", layout=fitted.layout)
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(reloaded(U), fitted(U))


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [1, 4])
def test_torch_compile_matches_eager(block_size):
    torch.manual_seed(0)
    layer = PSMLayer(48, 40, 0.6, nb_matrices=3, block_size=block_size)
    compiled = torch.compile(copy.deepcopy(layer), backend="aot_eager", fullgraph=True)
    U = torch.randn(6, 48, requires_grad=True)
    U_compiled = U.detach().clone().requires_grad_(True)
    expected, got = layer(U), compiled(U_compiled)
    torch.testing.assert_close(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(U_compiled.grad, U.grad)
    for (_, p), (_, q) in zip(layer.named_parameters(), compiled.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad)


@pytest.mark.slow
def test_distributed_data_parallel_single_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        layer = PSMLayer(24, 16, 0.5)
        model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(layer))
        U = torch.randn(8, 24)
        model(U).square().sum().backward()
        layer(U).square().sum().backward()
        for p, q in zip(layer.parameters(), model.module.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad)
    finally:
        dist.destroy_process_group()


def test_repr_shows_factors():
    text = repr(PSMLayer(64, 32, 0.25, nb_matrices=2))
    assert "nb_matrices=2" in text and "(32x32) x (32x64)" in text and "nnz=[256, 256]" in text
