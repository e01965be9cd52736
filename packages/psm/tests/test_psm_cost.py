import pytest
import torch

import structurednets
from structurednets.cost import Cost, dense_cost
from structurednets.testing import default_dtype
from structurednets_psm import PALMSettings, PSMLayer, fit_psm
from structurednets_psm.factors import SparseFactor


def test_cost_counted_by_hand_on_a_small_layout():
    # S_1 (3x4) holds 5 values and S_2 (4x5) holds 6: for a batch of 7 the forward does
    # 7 * (5 + 6) multiply-adds; the backward twice as many (input and values' gradient).
    layer = PSMLayer(5, 3, 1.0, factor_shapes=[[3, 4], [4, 5]], nonzeros=[5, 6])
    assert layer.cost(7) == Cost(77, 154)
    block = PSMLayer(8, 4, 1.0, factor_shapes=[[4, 4], [4, 8]], nonzeros=[8, 12], block_size=2)
    assert block.cost(3) == Cost(3 * 20, 6 * 20)
    assert layer.cost_ratio() == pytest.approx(3 * 11 / 3 / (3 * 5))


def test_cost_counts_the_support_of_every_factor():
    # independent count: one multiply-add per stored entry of each factor and input
    torch.manual_seed(0)
    layer = structurednets.create("psm", 48, 40, 0.3, nb_matrices=3, inner_dim=24)
    batch = 5
    stored = sum(int(f.crow_indices.diff().sum()) for f in layer.factors)
    assert layer.cost(batch) == Cost(batch * stored, 2 * batch * stored)
    assert layer.cost(batch).ratio(dense_cost(48, 40, batch)) == pytest.approx(stored / (48 * 40))


def test_bag_sum_kernel_with_empty_rows_and_empty_factor():
    # rows 1 and 3 hold no entries (empty bags give zero rows); a factor without values
    # gives a zero product
    rows = torch.tensor([0, 0, 2, 4])
    cols = torch.tensor([1, 3, 0, 2])
    values = torch.tensor([1.5, -2.0, 0.5, 3.0], dtype=torch.float64)
    with default_dtype(torch.float64):
        factor = SparseFactor(5, 4, rows, cols, values)
        empty = SparseFactor(3, 4, rows[:0], cols[:0], values[:0])
    Z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    dense = factor.to_dense().detach()
    torch.testing.assert_close(factor.matmul(Z), dense @ Z)
    G = torch.randn(5, 6, dtype=torch.float64)
    factor.matmul(Z).backward(G)
    torch.testing.assert_close(Z.grad, dense.T @ G)
    torch.testing.assert_close(factor.values.grad, (G @ Z.detach().T)[rows, cols])
    torch.testing.assert_close(empty.matmul(Z.detach()), torch.zeros(3, 6, dtype=torch.float64))


SHORT = PALMSettings(max_sweeps=60)


def test_max_cost_ratio_bounds_the_fit_and_names_the_smallest_ratio():
    target = torch.randn(40, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    free = PSMLayer(48, 40, 0.3, initial_weight_matrix=target, palm_settings=SHORT)
    bounded = PSMLayer(
        48, 40, 0.3, initial_weight_matrix=target, palm_settings=SHORT, max_cost_ratio=0.2
    )
    assert free.cost_ratio() == pytest.approx(0.3, abs=1 / (48 * 40))
    assert 0.2 - 1 / (48 * 40) < bounded.cost_ratio() <= 0.2
    assert "max_cost_ratio" not in bounded.layout_sizes()
    assert PSMLayer.accepts_max_cost_ratio is True
    # two 40x40 and 40x48 factors need at least 40 + 48 values: ratio 88 / 1920
    with pytest.raises(
        ValueError, match=r"max_cost_ratio=0.04.*smallest cost ratio of these factors, 0.0458333"
    ):
        PSMLayer(48, 40, 0.3, initial_weight_matrix=target, max_cost_ratio=0.04)
    with pytest.raises(ValueError, match="above max_cost_ratio"):
        PSMLayer(48, 40, 0.3, initial_weight_matrix=target, nonzeros=[200, 200], max_cost_ratio=0.1)
    with pytest.raises(TypeError, match="max_cost_ratio must be a positive number"):
        PSMLayer(48, 40, 0.3, max_cost_ratio="fast")
    with pytest.raises(ValueError, match="max_cost_ratio must be positive"):
        fit_psm(target, 400, max_cost_ratio=0.0)


def test_max_cost_ratio_is_ignored_by_random_layers_and_counts():
    torch.manual_seed(0)
    plain = structurednets.nb_parameters("psm", 48, 40, 0.3)
    assert structurednets.nb_parameters("psm", 48, 40, 0.3, max_cost_ratio=0.1) == plain
    layer = structurednets.create("psm", 48, 40, 0.3, max_cost_ratio=0.1)
    assert layer.get_nb_parameters() == plain


def test_kth_smallest_matches_kthvalue_with_ties_and_strides():
    from structurednets_psm.fit.projections import _kth_smallest

    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 5, (6, 40), generator=generator).double()  # many ties
    for matrix in (values, values.T, values.reshape(1, -1)):
        for k in (1, matrix.shape[-1] // 2 + 1, matrix.shape[-1]):
            expected = matrix.kthvalue(k, dim=-1, keepdim=True).values
            assert torch.equal(_kth_smallest(matrix, k), expected)


def testrows_least_squares_in_groups_matches_per_row_lstsq():
    from structurednets_psm.fit.least_squares import rows_least_squares

    generator = torch.Generator().manual_seed(0)
    rows, inner, cols = 150, 30, 50  # more than one group of 64 rows
    counts = torch.randint(0, 25, (rows,), generator=generator)
    support = torch.zeros(rows, inner, dtype=torch.bool)
    for r in range(rows):
        support[r, torch.randperm(inner, generator=generator)[: counts[r]]] = True
    right = torch.randn(inner, cols, dtype=torch.float64, generator=generator)
    target = torch.randn(rows, cols, dtype=torch.float64, generator=generator)
    solution = rows_least_squares(target, right, support)
    assert torch.equal(solution != 0, support)
    for r in range(rows):
        used = support[r].nonzero().squeeze(1)
        if used.numel():
            expected = torch.linalg.lstsq(right[used].T, target[r]).solution
            torch.testing.assert_close(solution[r, used], expected, rtol=1e-8, atol=1e-10)
