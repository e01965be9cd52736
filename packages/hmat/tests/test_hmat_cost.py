"""The cost an H-matrix layer reports from its layout, against counts of what its kernels do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import structurednets
from structurednets.numerics import relative_error
from structurednets_hmat import HMatLayer, HMatrixPartition, Leaf, fit_hmat
from structurednets_hmat.cost import partition_cost
from structurednets_hmat.fit import SEARCH_MARGIN
from structurednets_hmat.kernels import LEAF_BY_LEAF_MAX_LEAVES

aten = torch.ops.aten


def _in_place_addmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _in_place_baddbmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


# FlopCounterMode counts 2 flops per multiply-add of mm, bmm, addmm, baddbmm; the in-place
# forms the kernels accumulate with are added here with the same formula.
IN_PLACE = {aten.addmm_: _in_place_addmm, aten.baddbmm_: _in_place_baddbmm}


def _counted(layer: HMatLayer, batch: int) -> tuple[int, int]:
    """Multiply-adds torch runs in a forward, and in the backward with the input gradient."""
    U = torch.randn(batch, layer.input_dim, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE) as forward:
        Y = layer(U)
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE) as backward:
        Y.backward(torch.randn_like(Y))
    return forward.get_total_flops() // 2, backward.get_total_flops() // 2


def _kernel(rows: int, cols: int) -> np.ndarray:
    return 1.0 / (1.0 + np.abs(np.subtract.outer(np.arange(rows), np.arange(cols))))


@pytest.mark.parametrize("min_block_size", [256, 48, 16, 8])
@pytest.mark.parametrize("shape", [(96, 64), (64, 64)])
def test_cost_is_what_the_kernels_multiply(shape, min_block_size):
    """Leaf by leaf (one or a few leaves) and bucket by bucket (padding included)."""
    output_dim, input_dim = shape
    layer = HMatLayer(
        input_dim,
        output_dim,
        0.3,
        initial_weight_matrix=_kernel(*shape),
        min_block_size=min_block_size,
    )
    assert layer.cost(7) == structurednets.Cost(*_counted(layer, 7))


def test_random_layer_cost_counts_padding():
    """A random layer of many leaves runs bucket by bucket; its padded ranks are counted."""
    layer = HMatLayer(128, 128, 0.2)
    assert len(layer.partition.leaves) > LEAF_BY_LEAF_MAX_LEAVES
    assert any(bucket.padded for bucket in layer.buckets)
    assert layer.cost(5) == structurednets.Cost(*_counted(layer, 5))
    assert layer.cost(5).forward > 5 * layer.nb_weight_parameters


def test_cost_by_hand():
    """Two leaves of a 64 x 32 matrix, ranks 3 and 0 (no products), then 3 and dense."""
    blocks = HMatrixPartition.build(64, 32, min_block_size=64)
    assert partition_cost(blocks.with_ranks([3]), 10).forward == 10 * 3 * (64 + 32)
    halves = HMatrixPartition(
        64, 32, 0.5, 64, (Leaf(0, 32, 0, 32, 1, False), Leaf(32, 64, 0, 32, 1, False))
    )
    assert partition_cost(halves.with_ranks([3, 0]), 10).forward == 10 * 3 * (32 + 32)
    mixed = partition_cost(halves.with_ranks([3, 0], [False, True]), 10)
    assert mixed == structurednets.Cost(10 * (3 * 64 + 32 * 32), 2 * 10 * (3 * 64 + 32 * 32))


def test_one_block_costs_as_much_as_low_rank():
    """A fitted layer that is one low-rank block reports low rank's count."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((80, 4)) @ rng.standard_normal((4, 48))
    layer = structurednets.create("hmat", 48, 80, 0.25, initial_weight_matrix=weight)
    assert len(layer.partition.leaves) == 1
    rank = layer.partition.leaves[0].rank
    assert layer.cost(256) == structurednets.Cost(256 * rank * 128, 2 * 256 * rank * 128)
    assert layer.cost(7) == structurednets.Cost(*_counted(layer, 7))


def test_max_cost_ratio_bounds_the_fit():
    """Every bound is met; a tighter bound costs accuracy; a loose one changes nothing."""
    target = _kernel(128, 128)
    free = HMatLayer(128, 128, 0.3, initial_weight_matrix=target)
    errors = []
    for bound in (0.25, 0.1, 0.03):
        layer = HMatLayer(128, 128, 0.3, initial_weight_matrix=target, max_cost_ratio=bound)
        assert layer.cost_ratio() <= bound
        assert layer.nb_weight_parameters <= layer.weight_budget
        errors.append(relative_error(layer.to_dense().detach().double(), target))
    assert errors == sorted(errors) and errors[-1] > errors[0]
    loose = HMatLayer(128, 128, 0.3, initial_weight_matrix=target, max_cost_ratio=free.cost_ratio())
    assert loose.partition == free.partition


def test_max_cost_ratio_below_one_block_names_the_smallest():
    target = _kernel(64, 48)
    with pytest.raises(ValueError, match=r"max_cost_ratio must be at least ([0-9.e-]+)") as info:
        fit_hmat(target, 1000, max_cost_ratio=1e-4)
    smallest = float(str(info.value).split("at least ")[1].split(" ")[0])
    layer = HMatLayer(48, 64, 0.3, initial_weight_matrix=target, max_cost_ratio=smallest * 1.001)
    assert 0 < layer.cost_ratio() <= smallest * 1.001


def test_max_cost_ratio_is_a_fit_control():
    assert HMatLayer.accepts_max_cost_ratio is True
    count = structurednets.nb_parameters("hmat", 64, 64, 0.3)
    assert structurednets.nb_parameters("hmat", 64, 64, 0.3, max_cost_ratio=0.01) == count
    random = HMatLayer(64, 64, 0.3, max_cost_ratio=0.01)  # no fit: nothing to bound
    assert random.get_nb_parameters() == count
    fitted = HMatLayer(64, 64, 0.3, initial_weight_matrix=_kernel(64, 64), max_cost_ratio=0.2)
    assert set(fitted.layout.sizes) == {"partition"}
    with pytest.raises(TypeError, match="max_cost_ratio must be None or a positive number"):
        HMatLayer(64, 64, 0.3, max_cost_ratio="0.2")
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_cost_ratio must be a positive finite number"):
            fit_hmat(_kernel(64, 64), 1000, max_cost_ratio=bad)


def test_search_keeps_the_cheapest_candidate_within_the_margin():
    """No candidate the search considers is both as accurate (within SEARCH_MARGIN) and
    cheaper than what it keeps; on a low-rank matrix that is the whole matrix as one block."""
    rng = np.random.default_rng(3)
    target = rng.standard_normal((96, 3)) @ rng.standard_normal((3, 80))
    budget = int(0.3 * target.size)
    searched = fit_hmat(target, budget)
    error = relative_error(searched.to_dense(), target)
    for options in ({"min_block_size": 16}, {"merge_blocks": True}, {"min_block_size": 2}):
        other = fit_hmat(target, budget, **options)
        if relative_error(other.to_dense(), target) <= error + SEARCH_MARGIN:
            cost = partition_cost(searched.partition, 1).forward
            assert cost <= partition_cost(other.partition, 1).forward, options
    assert len(searched.partition.leaves) == 1
