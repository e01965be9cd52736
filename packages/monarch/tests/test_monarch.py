"""Monarch layer against independent computations: block pairs built by hand, numpy SVDs per
block (Eckart-Young), gradcheck against the dense reference, the planner's budget."""

import numpy as np
import pytest
import torch

import structurednets
from structurednets import BudgetTooSmallError
from structurednets.testing import default_dtype
from structurednets.validation import weight_budget
from structurednets_monarch import (
    MonarchLayer,
    MonarchShape,
    fit_monarch,
    kernels,
    monarch_multiply,
    monarch_nb_weight_parameters,
    monarch_project,
    plan_monarch,
)

# (input_dim, output_dim, k, q, rank): square, rectangular, uneven on one or both sides.
SHAPES = [
    (16, 16, 4, 4, 1),
    (32, 32, 4, 4, 3),
    (24, 10, 3, 2, 2),
    (10, 24, 2, 3, 2),
    (13, 7, 3, 2, 1),
    (31, 17, 4, 3, 3),
    (40, 27, 5, 4, 2),
    (50, 60, 4, 2, 5),
    (9, 20, 1, 5, 1),
]
# The search visits power-of-two block counts only.
SEARCH_SHAPES = [shape for shape in SHAPES if all(n & (n - 1) == 0 for n in shape[2:4])]
SEARCH_SHAPES.append((30, 21, 2, 4, 2))


def _edges(dim, nb_blocks):
    """Block boundaries computed independently of the package: sizes differ by at most one,
    the larger blocks first."""
    base, extra = divmod(dim, nb_blocks)
    sizes = [base + 1] * extra + [base] * (nb_blocks - extra)
    return np.concatenate([[0], np.cumsum(sizes)])


def random_monarch(input_dim, output_dim, k, q, rank, seed=0):
    """A dense matrix whose every block pair is a random rank-``rank`` product."""
    rng = np.random.default_rng(seed)
    rows, cols = _edges(output_dim, q), _edges(input_dim, k)
    W = np.zeros((output_dim, input_dim))
    for s in range(q):
        for j in range(k):
            height, width = rows[s + 1] - rows[s], cols[j + 1] - cols[j]
            block = rng.standard_normal((height, rank)) @ rng.standard_normal((rank, width))
            W[rows[s] : rows[s + 1], cols[j] : cols[j + 1]] = block
    return W


def dense_reference(layer):
    """``W`` from the parameters, block pair by block pair, with explicit index arithmetic."""
    shape = layer.monarch_shape
    k, q, r = shape.nb_input_blocks, shape.nb_output_blocks, shape.rank
    rights = list(layer.right) + ([] if layer.right_short is None else list(layer.right_short))
    lefts = list(layer.left) + ([] if layer.left_short is None else list(layer.left_short))
    rows, cols = _edges(layer.output_dim, q), _edges(layer.input_dim, k)
    W = torch.zeros(layer.output_dim, layer.input_dim, dtype=layer.right.dtype)
    for s in range(q):
        for j in range(k):
            A = lefts[s][:, j * r : (j + 1) * r]
            B = rights[j][s * r : (s + 1) * r, :]
            W[rows[s] : rows[s + 1], cols[j] : cols[j + 1]] = A @ B
    return W


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize(("input_dim", "output_dim", "k", "q", "rank"), SHAPES)
def test_projection_recovers_monarch_matrices(input_dim, output_dim, k, q, rank):
    W = random_monarch(input_dim, output_dim, k, q, rank)
    with default_dtype(torch.float64):
        layer = MonarchLayer(
            input_dim, output_dim, 1.0, initial_weight_matrix=W, nb_blocks=(k, q), rank=rank
        )
    assert layer.nb_blocks == (k, q) and layer.rank == rank
    assert relative(layer.to_dense().detach(), W) < 1e-6
    assert relative(dense_reference(layer).detach(), W) < 1e-6


@pytest.mark.parametrize(("input_dim", "output_dim", "k", "q", "rank"), SEARCH_SHAPES)
def test_search_finds_an_exact_layout_within_the_budget(input_dim, output_dim, k, q, rank):
    """Without options, the fit compares block counts; a matrix that is Monarch of a
    power-of-two layout is recovered at that layout's count (others may tie)."""
    W = torch.from_numpy(random_monarch(input_dim, output_dim, k, q, rank, seed=3))
    budget = MonarchShape(input_dim, output_dim, k, q, rank).nb_weight_parameters
    fit = fit_monarch(W, budget)
    assert fit.shape.nb_weight_parameters <= budget
    assert fit.relative_error < 1e-6


@pytest.mark.parametrize(("input_dim", "output_dim", "k", "q", "rank"), SHAPES)
def test_projection_is_the_truncated_svd_of_every_block_pair(input_dim, output_dim, k, q, rank):
    """Eckart-Young per block: each block pair of the projection equals numpy's truncated
    SVD of that block, and the error is the root of the discarded squared singular values."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal((output_dim, input_dim))
    shape = MonarchShape(input_dim, output_dim, k, q, rank)
    factors = monarch_project(torch.from_numpy(W), shape)
    projected = kernels.monarch_dense(
        shape, factors.right, factors.right_short, factors.left, factors.left_short
    ).numpy()
    rows, cols = _edges(output_dim, q), _edges(input_dim, k)
    tail = 0.0
    for s in range(q):
        for j in range(k):
            block = W[rows[s] : rows[s + 1], cols[j] : cols[j + 1]]
            U, S, Vt = np.linalg.svd(block, full_matrices=False)
            best = (U[:, :rank] * S[:rank]) @ Vt[:rank]
            got = projected[rows[s] : rows[s + 1], cols[j] : cols[j + 1]]
            np.testing.assert_allclose(got, best, rtol=1e-10, atol=1e-10)
            tail += float(np.sum(S[rank:] ** 2))
    expected_error = np.sqrt(tail) / np.linalg.norm(W)
    fit = fit_monarch(torch.from_numpy(W), shape.nb_weight_parameters, nb_blocks=(k, q))
    assert fit.shape == shape
    assert fit.relative_error == pytest.approx(expected_error, rel=1e-10)


def test_search_prefers_the_layout_with_the_smallest_error():
    """A noisy Monarch matrix of 8 x 8 blocks: the search finds a layout as good as every
    other candidate tried at the same budget, far better than one block (low rank)."""
    rng = np.random.default_rng(2)
    n = 64
    W = random_monarch(n, n, 8, 8, 1, seed=5) + 0.01 * rng.standard_normal((n, n))
    W = torch.from_numpy(W)
    budget = weight_budget(n, n, 0.25)
    fit = fit_monarch(W, budget)
    for blocks in [(1, 1), (2, 2), (4, 4), (8, 8), (2, 8), (8, 4)]:
        other = fit_monarch(W, budget, nb_blocks=blocks)
        assert fit.relative_error <= other.relative_error + 1e-12, blocks
    assert fit.shape.nb_input_blocks == fit.shape.nb_output_blocks == 8
    assert fit.relative_error < 0.05
    assert fit_monarch(W, budget, nb_blocks=1).relative_error > 0.5


@pytest.mark.parametrize(("input_dim", "output_dim", "k", "q", "rank"), SHAPES)
def test_forward_matches_the_dense_reference(input_dim, output_dim, k, q, rank):
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        layer = MonarchLayer(input_dim, output_dim, 1.0, nb_blocks=(k, q), rank=rank)
    U = torch.randn(5, input_dim, dtype=torch.float64)
    with torch.no_grad():
        expected = U @ dense_reference(layer).T + layer.bias
        torch.testing.assert_close(layer(U), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.to_dense(), dense_reference(layer), rtol=0, atol=1e-14)


@pytest.mark.parametrize(("input_dim", "output_dim", "k", "q", "rank"), SHAPES[2:7])
def test_gradients_match_the_dense_reference(input_dim, output_dim, k, q, rank):
    """gradcheck of the batched product, and its gradients equal those of ``U @ W.T`` with
    ``W`` assembled by hand from the same parameters."""
    torch.manual_seed(1)
    with default_dtype(torch.float64):
        layer = MonarchLayer(input_dim, output_dim, 1.0, nb_blocks=(k, q), rank=rank)
    shape = layer.monarch_shape
    U = torch.randn(3, input_dim, dtype=torch.float64, requires_grad=True)
    params = [layer.right, layer.right_short, layer.left, layer.left_short]
    present = [p for p in params if p is not None]

    def product(U, *values):
        values = iter(values)
        args = [None if p is None else next(values) for p in params]
        return monarch_multiply(U, shape, *args)

    assert torch.autograd.gradcheck(product, (U, *present), eps=1e-6, atol=1e-7, rtol=1e-6)
    G = torch.randn(3, output_dim, dtype=torch.float64)
    grads = torch.autograd.grad((product(U, *present) * G).sum(), (U, *present))
    reference = torch.autograd.grad((U @ dense_reference(layer).T * G).sum(), (U, *present))
    for got, expected in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_forward_never_forms_the_dense_weight(monkeypatch):
    layer = MonarchLayer(64, 48, 0.3)

    def forbidden(*args, **kwargs):
        raise AssertionError("forward formed the dense W")

    monkeypatch.setattr(kernels, "monarch_dense", forbidden)
    monkeypatch.setattr(MonarchLayer, "to_dense", forbidden)
    U = torch.randn(4, 64, requires_grad=True)
    layer(U).sum().backward()
    assert U.grad is not None and layer.right.grad is not None


def test_layout_sizes_rebuild_the_fitted_layer():
    W = np.random.default_rng(4).standard_normal((20, 30))
    fitted = MonarchLayer(30, 20, 0.4, initial_weight_matrix=W)
    sizes = fitted.layout_sizes()
    assert sizes == {"nb_blocks": list(fitted.nb_blocks), "rank": fitted.rank}
    fresh = MonarchLayer(30, 20, 0.4, **sizes)
    fresh.load_state_dict(fitted.state_dict())
    U = torch.randn(3, 30)
    with torch.no_grad():
        assert torch.equal(fresh(U), fitted(U))
    count = monarch_nb_weight_parameters(30, 20, 0.4, **sizes)
    assert count == fitted.nb_weight_parameters == fresh.nb_weight_parameters


@pytest.mark.parametrize("n", [64, 256, 784, 2048])
@pytest.mark.parametrize("share", [0.02, 0.1, 0.25, 0.5, 1.0])
def test_default_layout_uses_the_budget_and_never_exceeds_it(n, share):
    budget = weight_budget(n, n // 2, share)
    if budget < n + n // 2:  # below one block at rank 1
        with pytest.raises(BudgetTooSmallError, match="1 x 1 blocks"):
            plan_monarch(n, n // 2, share)
        return
    shape = plan_monarch(n, n // 2, share)
    assert shape.nb_weight_parameters <= budget
    assert shape.rank <= shape.max_rank
    # Never below 90% of what the best power-of-two layout (any block count) would hold.
    best = max(
        plan_monarch(n, n // 2, share, nb_blocks=(k, q)).nb_weight_parameters
        for k in (1, 2, 4, 8)
        for q in (1, 2, 4, 8)
        if budget >= q * n + k * (n // 2)
    )
    assert shape.nb_weight_parameters >= 0.9 * best


def test_default_layout_is_the_classic_block_count_with_a_rank():
    assert plan_monarch(2048, 2048, 0.1) == MonarchShape(2048, 2048, 32, 32, 3)
    assert plan_monarch(256, 256, 0.25) == MonarchShape(256, 256, 16, 16, 2)
    layer = structurednets.create("monarch", 1024, 1024, 0.1)
    assert layer.nb_weight_parameters <= layer.weight_budget
    assert structurednets.nb_parameters("monarch", 1024, 1024, 0.1) == layer.get_nb_parameters()


def test_options_are_checked():
    with pytest.raises(BudgetTooSmallError, match="nb_params_share"):
        MonarchLayer(100, 100, 0.01)  # rank 1 with one block needs 200 > 100
    with pytest.raises(BudgetTooSmallError, match="8 x 8 blocks"):
        MonarchLayer(64, 64, 0.1, nb_blocks=8, rank=4)
    with pytest.raises(ValueError, match="rank must be at most 4"):
        MonarchLayer(16, 16, 1.0, nb_blocks=4, rank=5)
    with pytest.raises(ValueError, match="nb_blocks"):
        MonarchLayer(16, 8, 1.0, nb_blocks=(4, 9))
    with pytest.raises(TypeError, match="nb_blocks"):
        MonarchLayer(16, 8, 1.0, nb_blocks="4")
    with pytest.raises(TypeError, match="rank"):
        MonarchLayer(16, 8, 1.0, rank=1.5)
    with pytest.raises(BudgetTooSmallError):
        fit_monarch(torch.zeros(10, 10), 19)
    with pytest.raises(ValueError, match=r"\(6, 5\)"):
        monarch_project(torch.zeros(5, 6), MonarchShape(5, 6, 1, 1, 1))


@pytest.mark.parametrize(("input_dim", "output_dim", "k", "q", "rank"), SHAPES[1:7])
def test_cost_counts_the_multiply_adds_torch_counts(input_dim, output_dim, k, q, rank):
    """``layout_cost`` against torch's own FLOP counter over forward and backward (every
    multiply-add is in a ``bmm``; the counter reports 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = MonarchLayer(input_dim, output_dim, 1.0, nb_blocks=(k, q), rank=rank)
    U = torch.randn(8, input_dim, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        Y = layer(U)
    forward = counter.get_total_flops() // 2
    with counter:
        Y.backward(torch.randn_like(Y))
    backward = counter.get_total_flops() // 2
    cost = layer.cost(8)
    assert (cost.forward, cost.backward) == (forward, backward)
    assert forward == 8 * layer.nb_weight_parameters
