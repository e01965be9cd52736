import math

import numpy as np
import pytest
import torch

import structurednets
from structurednets.testing import ConformanceCase, conformance_checks, default_dtype
from structurednets_psm import BlockSparseFactor, PALMSettings, PSMLayer, layer_sizes

# The kit's budget grid has prime sizes, which no block size > 1 divides; the other checks
# run on a block layer with dimensions that 4 divides.
BLOCK_CASE = ConformanceCase(
    "psm",
    options={"block_size": 4},
    gradcheck_shape=(8, 12),
    gradcheck_share=1.0,
    shapes=((16, 16), (24, 8), (8, 24), (32, 12)),
)
GRID_CHECKS = {"forward_matches_dense", "budget_and_parameter_counts"}


# distributed, compile and fitting checks (as in test_psm_conformance.py)
SLOW = {
    "distributed_training",
    "torch_compile",
    "random_valid_arguments",
    "random_invalid_arguments",
    "initial_weight_matrix",
    "approximation_robustness",
    "layout_round_trip",
    "save_and_load",
}


@pytest.mark.parametrize(
    "check",
    [
        pytest.param(c, marks=pytest.mark.slow) if c.name in SLOW else c
        for c in conformance_checks()
        if c.name not in GRID_CHECKS
    ],
    ids=str,
)
def test_block_layer_conformance(check):
    check(BLOCK_CASE)


def test_block_budget_grid_counts_and_smallest_share():
    for input_dim, output_dim in BLOCK_CASE.shapes:
        for share in (0.1, 0.25, 0.5, 1.0):
            try:
                predicted = structurednets.nb_parameters(
                    "psm", input_dim, output_dim, share, use_bias=False, block_size=4
                )
            except structurednets.BudgetTooSmallError as error:
                layer = PSMLayer(input_dim, output_dim, error.min_share, block_size=4)
                assert layer.nb_weight_parameters <= layer.weight_budget
                continue
            layer = PSMLayer(input_dim, output_dim, share, use_bias=False, block_size=4)
            assert layer.nb_weight_parameters == predicted <= layer.weight_budget
            assert all(f.nnz % 16 == 0 for f in layer.factors)


def test_block_sizes_use_whole_blocks():
    sizes = layer_sizes(64, 32, 0.5, block_size=8)
    assert sizes.block_size == 8
    assert sizes.nonzeros == (8 * 64, 8 * 64)  # 16 whole blocks of the 1024-value budget
    with pytest.raises(structurednets.BudgetTooSmallError, match=r"of 8x8 blocks .* 0\.375"):
        PSMLayer(64, 32, 0.3, block_size=8)
    with pytest.raises(ValueError, match=r"block_size=5 must divide input_dim, output_dim"):
        PSMLayer(64, 32, 0.3, block_size=5)
    with pytest.raises(ValueError, match="cannot be combined with factors"):
        PSMLayer(4, 4, 1.0, block_size=2, factors=[torch.eye(4).to_sparse()])


def test_block_factor_products_match_dense_in_both_directions():
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        layer = PSMLayer(48, 32, 0.7, nb_matrices=3, block_size=8, use_bias=False)
    assert all(isinstance(f, BlockSparseFactor) for f in layer.factors)
    dense = [f.to_dense().detach().requires_grad_(True) for f in layer.factors]
    U = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    U_reference = U.detach().clone().requires_grad_(True)
    output = layer(U)
    reference = U_reference @ (dense[0] @ dense[1] @ dense[2]).T
    torch.testing.assert_close(output, reference)
    gradient = torch.randn_like(output)
    output.backward(gradient)
    reference.backward(gradient)
    torch.testing.assert_close(U.grad, U_reference.grad)
    for factor, matrix in zip(layer.factors, dense, strict=True):
        b = factor.block_size
        blocks = matrix.grad.reshape(factor.rows // b, b, factor.cols // b, b).permute(0, 2, 1, 3)
        torch.testing.assert_close(factor.values.grad, blocks[factor.block_rows, factor.block_cols])
    np.testing.assert_allclose(
        layer.factors[0].to_scipy().toarray(), dense[0].detach().numpy(), rtol=1e-12
    )


def test_block_supports_cover_every_block_row_and_column():
    torch.manual_seed(1)
    layer = PSMLayer(128, 96, 0.25, block_size=8)
    for factor in layer.factors:
        rows, cols = factor.rows // 8, factor.cols // 8
        assert torch.bincount(factor.block_rows, minlength=rows).min() >= 1
        assert torch.bincount(factor.block_cols, minlength=cols).min() >= 1
        assert (factor.block_rows * cols + factor.block_cols).unique().numel() == len(
            factor.block_rows
        )


@pytest.mark.slow
def test_block_fit_is_block_aligned_and_close():
    i = np.arange(64)
    target = 1.0 / (1.0 + np.abs(i[:, None] - i[None, :]))
    with default_dtype(torch.float64):
        fitted = PSMLayer(64, 64, 0.25, initial_weight_matrix=target, block_size=4)
    error = np.linalg.norm(fitted.to_dense().detach().numpy() - target) / np.linalg.norm(target)
    assert error < 0.3  # the element-sparse fit reaches 0.01 here; blocks are coarser
    assert fitted.nb_weight_parameters == fitted.weight_budget
    assert all(f.nnz % 16 == 0 for f in fitted.factors)
    assert math.isclose(error, fitted.fit.relative_error, rel_tol=1e-9)


def test_block_layout_rebuilds_a_fitted_block_layer():
    i = np.arange(32)
    target = 1.0 / (1.0 + np.abs(i[:16, None] - i[None, :]))
    fitted = PSMLayer(
        32, 16, 0.5, initial_weight_matrix=target, block_size=4,
        palm_settings=PALMSettings(max_sweeps=100),
    )  # fmt: skip
    sizes = fitted.layout.sizes
    assert sizes["block_size"] == 4 and all(count % 16 == 0 for count in sizes["nonzeros"])
    assert list(sizes["nonzeros"]) == [f.nnz for f in fitted.factors]
    twin = structurednets.create("psm", layout=fitted.layout)
    assert all(isinstance(f, BlockSparseFactor) for f in twin.factors)
    twin.load_state_dict(fitted.state_dict())
    assert torch.equal(twin.to_dense(), fitted.to_dense())
    assert {"factors.0.block_rows", "factors.1.block_cols"} <= set(fitted.state_dict())
