import copy

import numpy as np
import pytest
import torch

import structurednets
from structurednets import BudgetTooSmallError
from structurednets.numerics import relative_error
from structurednets.testing import default_dtype
from structurednets_hmat import (
    HMatLayer,
    HMatrixPartition,
    fit_hmat,
    hmat_nb_weight_parameters,
)
from structurednets_hmat.kernels import leaf_by_leaf


def smooth_matrix(rows, cols, seed=0):
    """A kernel-like matrix plus noise: fitted ranks differ from leaf to leaf."""
    rng = np.random.default_rng(seed)
    i, j = np.arange(rows)[:, None] / rows, np.arange(cols)[None, :] / cols
    return 1.0 / (0.05 + np.abs(i - j)) + 0.3 * rng.standard_normal((rows, cols))


def fitted_layer(rows, cols, share, **options):
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        return HMatLayer(
            cols, rows, share, initial_weight_matrix=smooth_matrix(rows, cols), **options
        )


# Shapes with regular (strided) and irregular (gathered) partitions, ragged fitted ranks, and
# dense leaves.
LAYERS = [(64, 64, 0.3, 4), (61, 45, 0.4, 4), (37, 90, 0.35, 3), (48, 40, 0.9, 4)]


@pytest.mark.parametrize("rows, cols, share, min_block_size", LAYERS)
def test_forward_matches_the_hmatrix_built_leaf_by_leaf(rows, cols, share, min_block_size):
    layer = fitted_layer(rows, cols, share, min_block_size=min_block_size)
    dense = layer.to_hmatrix().to_dense()  # assembled leaf by leaf, not through the buckets
    U = torch.randn(7, cols, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(U), U @ dense.T + layer.bias, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.to_dense(), dense, rtol=1e-12, atol=1e-12)
    kinds = {(b.dense, b.rows.strided and b.cols.strided) for b in layer.buckets}
    ranks = [leaf.rank for leaf in layer.partition.leaves if not leaf.dense]
    assert len(set(ranks)) > 1  # ragged ranks: padded buckets
    if share == 0.9:
        assert any(b.dense for b in layer.buckets) and any(not b.dense for b in layer.buckets)
    else:  # dense and low-rank, or strided and gathered buckets
        assert len(kinds) > 1


@pytest.mark.parametrize(
    "rows, cols, share, min_block_size",
    [LAYERS[0], *(pytest.param(*layer, marks=pytest.mark.slow) for layer in LAYERS[1:])],
)
def test_gradients_through_buckets(rows, cols, share, min_block_size):
    layer = fitted_layer(rows, cols, share, min_block_size=min_block_size)
    names = [name for name, _ in layer.named_parameters()]
    values = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    U = torch.randn(3, cols, dtype=torch.float64, requires_grad=True)

    def function(U, *values):
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (U,))

    assert torch.autograd.gradcheck(function, (U, *values), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_fitted_layer_is_the_approximation():
    target = smooth_matrix(70, 50)
    layer = fitted_layer(70, 50, 0.3, min_block_size=4)
    hmatrix = fit_hmat(target, layer.weight_budget, min_block_size=4)
    assert layer.partition == hmatrix.partition
    assert relative_error(layer.to_dense(), target) == pytest.approx(
        relative_error(hmatrix.to_dense(), target), rel=1e-10
    )
    assert layer.nb_weight_parameters == hmatrix.nb_parameters <= layer.weight_budget


def test_start_from_an_hmatrix_or_a_partition():
    layer = fitted_layer(61, 45, 0.4, min_block_size=4)
    with default_dtype(torch.float64):
        copied = HMatLayer(
            45, 61, 0.4, hmatrix=layer.to_hmatrix(), initial_bias=layer.bias.detach()
        )
        shaped = HMatLayer(45, 61, 0.4, partition=layer.partition)
    U = torch.randn(5, 45, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(copied(U), layer(U), rtol=1e-12, atol=1e-12)
        shaped.load_state_dict(layer.state_dict())
        torch.testing.assert_close(shaped(U), layer(U), rtol=1e-12, atol=1e-12)
    assert hmat_nb_weight_parameters(45, 61, 0.4, partition=layer.partition) == (
        layer.nb_weight_parameters
    )
    assert structurednets.nb_parameters("hmat", 45, 61, 0.4, hmatrix=layer.to_hmatrix()) == (
        layer.get_nb_parameters()
    )


def test_random_layer_fills_the_budget_with_every_block():
    layer = HMatLayer(300, 200, 0.15, min_block_size=8)
    leaves = layer.partition.leaves
    assert all(leaf.rank >= 1 or leaf.dense for leaf in leaves)
    smallest_step = min(leaf.nb_rows + leaf.nb_cols for leaf in leaves)
    assert layer.weight_budget - smallest_step < layer.nb_weight_parameters <= layer.weight_budget
    assert layer.nb_weight_parameters == hmat_nb_weight_parameters(300, 200, 0.15, min_block_size=8)


def test_regular_partition_needs_no_gathers():
    layer = HMatLayer(256, 256, 0.1)
    assert all(b.rows.strided and b.cols.strided for b in layer.buckets)
    assert not [name for name, _ in layer.named_buffers() if name.startswith(("_rows", "_cols"))]
    # One bucket per block shape: 16, 32 and 64 rows.
    assert sorted(b.shape for b in layer.buckets) == [(16, 16), (32, 32), (64, 64)]


def test_autocast_and_deepcopy():
    layer = HMatLayer(64, 48, 0.3, min_block_size=4)
    U = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = layer(U)
    assert result.dtype == torch.bfloat16  # core's autocast policy: what nn.Linear returns
    with torch.no_grad():
        torch.testing.assert_close(result.float(), layer(U), rtol=2e-2, atol=2e-2)
    duplicate = copy.deepcopy(layer)
    assert duplicate.partition == layer.partition and duplicate.buckets == layer.buckets


def test_summary_in_repr():
    layer = HMatLayer(128, 128, 0.2)
    text = repr(layer)
    assert "eta=0.5, min_block_size=16" in text and f"leaves={len(layer.partition.leaves)}" in text


def test_option_errors():
    layer = fitted_layer(40, 30, 0.5, min_block_size=4)
    target = smooth_matrix(40, 30)
    with pytest.raises(ValueError, match="either hmatrix or partition"):
        HMatLayer(30, 40, 0.5, hmatrix=layer.to_hmatrix(), partition=layer.partition)
    with pytest.raises(ValueError, match="either initial_weight_matrix or hmatrix/partition"):
        HMatLayer(30, 40, 0.5, initial_weight_matrix=target, partition=layer.partition)
    with pytest.raises(TypeError, match="hmatrix must be a structurednets_hmat.HMatrix"):
        HMatLayer(30, 40, 0.5, hmatrix=target)
    with pytest.raises(TypeError, match="partition must be a structurednets_hmat.HMatrixPartition"):
        HMatLayer(30, 40, 0.5, partition="quadtree")
    with pytest.raises(ValueError, match="partition is for a 40 x 30 matrix"):
        HMatLayer(40, 30, 0.5, partition=layer.partition)
    with pytest.raises(ValueError, match=r"eta=2 disagrees with the eta of partition \(0.5\)"):
        HMatLayer(30, 40, 0.5, partition=layer.partition, eta=2)
    with pytest.raises(ValueError, match="min_block_size must be a positive integer"):
        HMatLayer(30, 40, 0.5, min_block_size=-2)
    with pytest.raises(BudgetTooSmallError, match="the given partition needs"):
        HMatLayer(30, 40, 0.05, partition=layer.partition)


def test_budget_too_small_names_the_smallest_share():
    blocks = HMatrixPartition.build(100, 100, min_block_size=16)
    needed = sum(leaf.nb_rows + leaf.nb_cols for leaf in blocks.leaves)
    with pytest.raises(BudgetTooSmallError) as info:
        structurednets.create("hmat", 100, 100, 0.01)
    assert info.value.needed == needed
    assert f"rank 1 in each of its {len(blocks.leaves)} blocks" in str(info.value)
    assert HMatLayer(100, 100, info.value.min_share).nb_weight_parameters >= needed
    # A fitted layer may leave blocks at rank 0: it needs only one block of rank 1.
    target = smooth_matrix(100, 100)
    fitted = HMatLayer(100, 100, 0.01, initial_weight_matrix=target)
    assert 0 < fitted.nb_weight_parameters <= fitted.weight_budget
    assert relative_error(fitted.to_dense(), target) < 1.0
    with pytest.raises(BudgetTooSmallError, match="its smallest block at rank 1 needs 50"):
        HMatLayer(100, 100, 0.003, initial_weight_matrix=target)


def test_merged_blocks_layer():
    layer = fitted_layer(64, 64, 0.3, min_block_size=4, merge_blocks=True)
    standard = fitted_layer(64, 64, 0.3, min_block_size=4)
    target = smooth_matrix(64, 64)
    assert relative_error(layer.to_dense(), target) <= relative_error(standard.to_dense(), target)
    assert len(layer.partition.leaves) < len(standard.partition.leaves)
    dense = layer.to_hmatrix().to_dense()
    U = torch.randn(5, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(U), U @ dense.T + layer.bias, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="merge_blocks=True applies only to fitting"):
        HMatLayer(64, 64, 0.3, merge_blocks=True)


@pytest.mark.parametrize("rows, cols, share, min_block_size", LAYERS[:2])
def test_empty_batch_and_strided_input(rows, cols, share, min_block_size):
    layer = fitted_layer(rows, cols, share, min_block_size=min_block_size)
    empty = torch.zeros(0, cols, dtype=torch.float64, requires_grad=True)
    result = layer(empty)
    result.sum().backward()
    assert result.shape == (0, rows) and empty.grad.shape == (0, cols)
    strided = torch.randn(4, 2 * cols, dtype=torch.float64)[:, ::2]
    with torch.no_grad():
        expected = strided @ layer.to_dense().T + layer.bias
        torch.testing.assert_close(layer(strided), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_fitted_layer_searches_but_random_layer_does_not_change():
    target = np.random.default_rng(8).standard_normal((128, 128))
    fitted = structurednets.create("hmat", 128, 128, 0.25, initial_weight_matrix=target)
    assert fitted.partition.min_block_size == 2  # regression figure: the search's pick
    expected = fit_hmat(target, fitted.weight_budget)
    assert fitted.partition == expected.partition
    plain = structurednets.create(
        "hmat", 128, 128, 0.25, initial_weight_matrix=target, min_block_size=16
    )
    assert plain.partition.min_block_size == 16
    assert relative_error(fitted.to_dense(), target) < relative_error(plain.to_dense(), target)
    random_layer = structurednets.create("hmat", 128, 128, 0.25)
    assert random_layer.partition == HMatLayer(128, 128, 0.25, min_block_size=16).partition
    assert random_layer.nb_weight_parameters == hmat_nb_weight_parameters(128, 128, 0.25)


def few_leaf_layers():
    """Layers that run leaf by leaf: fitted with a dense bucket, a padded bucket of ragged
    ranks (and a zero leaf), and the whole matrix as one low-rank block."""
    with default_dtype(torch.float64):
        torch.manual_seed(1)
        ragged = HMatrixPartition.build(64, 64, min_block_size=32).with_ranks([3, 1, 2, 0])
        return [
            fitted_layer(48, 40, 0.9, min_block_size=16),
            HMatLayer(64, 64, 0.5, partition=ragged),
            fitted_layer(48, 40, 0.3, min_block_size=64),
        ]


@pytest.mark.parametrize("number", range(3))
def test_few_leaves_run_leaf_by_leaf(number):
    layer = few_leaf_layers()[number]
    assert leaf_by_leaf(layer.buckets)
    if number == 1:
        assert any(not b.dense and b.padded for b in layer.buckets)
    dense = layer.to_hmatrix().to_dense()
    U = torch.randn(5, layer.input_dim, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(U), U @ dense.T + layer.bias, rtol=1e-12, atol=1e-12)
        strided = torch.randn(4, 2 * layer.input_dim, dtype=torch.float64)[:, ::2]
        expected = strided @ dense.T + layer.bias
        torch.testing.assert_close(layer(strided), expected, rtol=1e-12, atol=1e-12)
    names = [name for name, _ in layer.named_parameters()]
    values = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]

    def function(U, *values):
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (U,))

    assert torch.autograd.gradcheck(function, (U, *values), eps=1e-6, atol=1e-6, rtol=1e-4)
    empty = torch.zeros(0, layer.input_dim, dtype=torch.float64, requires_grad=True)
    layer(empty).sum().backward()
    assert empty.grad.shape == (0, layer.input_dim)
