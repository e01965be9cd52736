"""The fit (system identification): exact recovery, optimal truncation, error bookkeeping,
accuracy."""

import numpy as np
import pytest
import torch

from structurednets import BudgetTooSmallError
from structurednets.numerics import relative_error
from structurednets.testing import default_dtype, smooth_kernel
from structurednets_sss import SSSLayer, fit_sss
from structurednets_sss.layout import block_sizes


def random_sss_matrix(input_sizes, output_sizes, dim, rng):
    """A dense matrix built stage by stage from a random system with state dimension ``dim``
    (independent of the package: explicit block products)."""
    K = len(input_sizes)
    row = np.concatenate([[0], np.cumsum(output_sizes)])
    col = np.concatenate([[0], np.cumsum(input_sizes)])
    W = np.zeros((row[-1], col[-1]))
    A = [rng.standard_normal((dim, dim)) / np.sqrt(dim) for _ in range(K)]
    E = [rng.standard_normal((dim, dim)) / np.sqrt(dim) for _ in range(K)]
    B = [rng.standard_normal((dim, n)) for n in input_sizes]
    F = [rng.standard_normal((dim, n)) for n in input_sizes]
    C = [rng.standard_normal((m, dim)) for m in output_sizes]
    G = [rng.standard_normal((m, dim)) for m in output_sizes]
    for k in range(K):
        for j in range(K):
            block = (slice(row[k], row[k + 1]), slice(col[j], col[j + 1]))
            if k == j:
                W[block] = rng.standard_normal((output_sizes[k], input_sizes[j]))
            elif k > j:
                product = B[j]
                for i in range(j + 1, k):
                    product = A[i] @ product
                W[block] = C[k] @ product
            else:
                product = F[j]
                for i in range(j - 1, k, -1):
                    product = E[i] @ product
                W[block] = G[k] @ product
    return W


def minimal_dims(input_sizes, output_sizes, dim):
    """State dimensions of the minimal realisation: min(dim, Hankel block sizes)."""
    before = np.cumsum(input_sizes)[:-1]
    after = np.sum(output_sizes) - np.cumsum(output_sizes)[:-1]
    causal = [min(dim, b, a) for b, a in zip(before, after, strict=True)]
    before_rows = np.cumsum(output_sizes)[:-1]
    after_cols = np.sum(input_sizes) - np.cumsum(input_sizes)[:-1]
    anticausal = [min(dim, b, a) for b, a in zip(before_rows, after_cols, strict=True)]
    return causal, anticausal


@pytest.mark.parametrize(
    "output_dim, input_dim, nb_stages, dim, give_nb_states",
    [
        (64, 64, 8, 3, False),
        (64, 64, 8, 3, True),
        (60, 90, 6, 4, False),
        (60, 90, 6, 4, True),
        # 7 stages is not among the numbers of stages searched: it must be given.
        (75, 50, 7, 2, True),
        (100, 100, 16, 5, False),
    ],
)
def test_random_sss_matrix_is_recovered_within_its_parameter_count(
    output_dim, input_dim, nb_stages, dim, give_nb_states, weight_count
):
    rng = np.random.default_rng(output_dim + dim)
    input_sizes = block_sizes(input_dim, nb_stages)
    output_sizes = block_sizes(output_dim, nb_stages)
    target = random_sss_matrix(input_sizes, output_sizes, dim, rng)
    count = weight_count(input_sizes, output_sizes, *minimal_dims(input_sizes, output_sizes, dim))
    share = count / (input_dim * output_dim) + 1e-9
    options = {"nb_states": nb_stages} if give_nb_states else {}
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        with default_dtype(dtype):
            layer = SSSLayer(input_dim, output_dim, share, initial_weight_matrix=target, **options)
        assert layer.nb_weight_parameters <= count
        assert relative_error(layer.to_dense(), target) <= tolerance, (dtype, layer)


def test_recovery_needs_the_state_dimension(weight_count):
    """One parameter short of the minimal realisation, the error is no longer zero."""
    rng = np.random.default_rng(5)
    sizes = block_sizes(48, 6)
    target = random_sss_matrix(sizes, sizes, 3, rng)
    count = weight_count(sizes, sizes, *minimal_dims(sizes, sizes, 3))
    with default_dtype(torch.float64):
        short = SSSLayer(48, 48, (count - 1) / 48**2, initial_weight_matrix=target, nb_states=6)
    assert relative_error(short.to_dense(), target) > 1e-6


def test_two_stages_truncate_the_off_diagonal_blocks_optimally():
    """With K = 2 each part is one Hankel block: the error is the truncated SVD's (Eckart-Young)."""
    rng = np.random.default_rng(1)
    target = rng.standard_normal((30, 40)) * np.logspace(0, -2, 40)
    with default_dtype(torch.float64):
        layer = SSSLayer(40, 30, 1.0, initial_weight_matrix=target, nb_states=2, state_dim=4)
    lower = np.linalg.svd(target[15:, :20], compute_uv=False)
    upper = np.linalg.svd(target[:15, 20:], compute_uv=False)
    optimum = np.sqrt(np.sum(lower[4:] ** 2) + np.sum(upper[4:] ** 2)) / np.linalg.norm(target)
    assert relative_error(layer.to_dense(), target) == pytest.approx(optimum, rel=1e-9)


@pytest.mark.parametrize("shape, share", [((50, 70), 0.3), ((64, 31), 0.5), ((33, 33), 0.15)])
def test_reported_error_is_the_actual_error(shape, share):
    rng = np.random.default_rng(2)
    target = rng.standard_normal(shape)
    budget = int(share * shape[0] * shape[1])
    fitted = fit_sss(target, budget)
    dense = fitted.system.to_dense().numpy()
    assert np.sum((dense - target) ** 2) == pytest.approx(fitted.squared_error, rel=1e-9)
    assert fitted.sizes.nb_weight_parameters <= budget


def test_fixed_state_dimensions_are_respected():
    rng = np.random.default_rng(3)
    target = rng.standard_normal((40, 48))
    dims = (1, 2, 3, 2, 1)
    layer = SSSLayer(
        48, 40, 0.9, initial_weight_matrix=target, state_dim=dims, anticausal_state_dim=0
    )
    assert layer.nb_states == 6
    assert layer.state_dims == dims
    assert layer.anticausal_state_dims == (0,) * 5
    with torch.no_grad():
        dense = layer.to_dense().double().numpy()
    # No anticausal state: above the diagonal blocks the matrix is zero.
    sizes = block_sizes(48, 6)
    assert np.all(dense[: block_sizes(40, 6)[0], sizes[0] :] == 0)


def test_budget_too_small_for_fixed_options_names_the_share():
    target = np.random.default_rng(4).standard_normal((32, 32))
    with pytest.raises(BudgetTooSmallError, match="nb_params_share >= ") as info:
        SSSLayer(32, 32, 0.1, initial_weight_matrix=target, nb_states=8, state_dim=3)
    layer = SSSLayer(
        32, 32, info.value.min_share, initial_weight_matrix=target, nb_states=8, state_dim=3
    )
    assert layer.nb_weight_parameters <= layer.weight_budget


# MatthiasKi/structurednets 1.0 reached these errors on this kernel (its README's table).
@pytest.mark.slow
@pytest.mark.parametrize("share, reference_error", [(0.1, 1.03e-3), (0.25, 2.0e-6)])
def test_smooth_kernel_ten_times_more_accurate_than_structurednets_1(share, reference_error):
    target = smooth_kernel(512, 512)
    with default_dtype(torch.float64):
        layer = SSSLayer(512, 512, share, initial_weight_matrix=target)
    assert relative_error(layer.to_dense(), target) <= reference_error / 10
    assert layer.nb_weight_parameters <= layer.weight_budget


def test_gaussian_better_than_one_stage_per_two_rows():
    """MatthiasKi/structurednets 1.0's fixed layout (K = n/2, one state dimension) reached
    0.987 at share 0.1."""
    target = np.random.default_rng(6).standard_normal((256, 256))
    layer = SSSLayer(256, 256, 0.1, initial_weight_matrix=target)
    assert relative_error(layer.to_dense(), target) < 0.96
