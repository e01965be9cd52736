import numpy as np
import pytest
import scipy.linalg
import torch

from structurednets.testing import default_dtype
from structurednets.testing import layer_relative_error as relative_error
from structurednets_psm import PALMSettings, PSMLayer, fit_psm
from structurednets_psm.fit import largest_entries_mask, project


def test_largest_entries_mask_breaks_ties_towards_lower_index():
    values = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0, 0.0]])
    mask = largest_entries_mask(values, 2)
    assert mask.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]


def test_projections_keep_largest_entries_normalised():
    matrix = torch.tensor([[4.0, -1.0, 0.5], [0.1, -3.0, 2.0]], dtype=torch.float64)
    projected, support = project(matrix, 3, "global")
    assert support.tolist() == [[True, False, False], [False, True, True]]
    assert torch.linalg.norm(projected) == pytest.approx(1.0)
    projected, support = project(matrix, 2, "rowcol")  # 1 per row, 1 per column, united
    assert support.tolist() == [[True, False, False], [False, True, True]]


@pytest.mark.parametrize("k", [3, 5, pytest.param(7, marks=pytest.mark.slow)])
def test_hadamard_is_recovered_exactly(k):
    n = 2**k
    hadamard = scipy.linalg.hadamard(n).astype(np.float64)
    share = 2 * n * k / (n * n)  # k factors with 2 nonzeros per row
    layer = PSMLayer(n, n, share, initial_weight_matrix=hadamard, nb_matrices=k)
    assert relative_error(layer, hadamard) <= 1e-4
    assert all(f.nnz == 2 * n for f in layer.factors)
    for factor in layer.factors:
        dense = factor.to_dense().detach()
        assert (dense != 0).sum(1).max() == 2 and (dense != 0).sum(0).max() == 2


@pytest.mark.slow
def test_gaussian_beats_faust():
    # FAuST's hierarchical factorisation, as MatthiasKi/structurednets 1.0 calls it: 0.218 here.
    target = np.random.default_rng(0).standard_normal((64, 64))
    layer = PSMLayer(64, 64, 0.5, initial_weight_matrix=target)
    assert relative_error(layer, target) < 0.218
    assert layer.nb_weight_parameters <= layer.weight_budget


def test_unstructured_targets_stop_the_search_and_get_a_share_of_the_budget():
    """A Gaussian target ends the first two modes far from exact: no other candidate is
    started, and the fit spends ``unstructured_share`` of the work budget."""
    from structurednets_psm.fit.search import candidate_splits, schedule

    target = torch.from_numpy(np.random.default_rng(3).standard_normal((48, 48)))
    settings = PALMSettings()
    fit = fit_psm(target, 1152, settings=settings)
    assert [strategy.projection for strategy, _ in fit.tried] == ["global", "rowcol"]
    total = schedule([(48, 48), (48, 48)], candidate_splits(2), settings).total_updates
    assert fit.nb_updates <= settings.unstructured_share * total + 2
    whole = fit_psm(target, 1152, settings=PALMSettings(unstructured_error=float("inf")))
    assert len(whole.tried) == 7 and whole.nb_updates > 0.9 * total
    assert fit.relative_error < 1.2 * whole.relative_error  # 0.173 against 0.151 here


def test_largest_eigenvalue_is_the_spectral_norm_of_a_gram_matrix():
    from structurednets_psm.fit.palm import Numerics

    M = torch.randn(30, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    norms = Numerics(torch.Generator().manual_seed(0), 4)
    expected = float(torch.linalg.matrix_norm(M, 2)) ** 2
    for _ in range(20):  # warm-started: converges over calls
        value = norms.largest_eigenvalue(M @ M.T, "key")
    assert value == pytest.approx(expected, rel=1e-6)
    assert norms.squared(M, "other") <= expected * (1 + 1e-12)


@pytest.mark.slow
def test_toeplitz_beats_faust():
    # FAuST in MatthiasKi/structurednets 1.0's configuration (best of 34 runs): 0.0098 here.
    i = np.arange(64)
    target = 1.0 / (1.0 + np.abs(i[:, None] - i[None, :]))
    layer = PSMLayer(64, 64, 0.5, initial_weight_matrix=target)
    assert relative_error(layer, target) < 0.0098


def test_fit_is_deterministic_and_reported():
    target = np.random.default_rng(1).standard_normal((24, 40))
    settings = PALMSettings(max_sweeps=300)
    first = PSMLayer(
        40, 24, 0.3, initial_weight_matrix=target, palm_settings=settings, nb_matrices=3
    )
    torch.manual_seed(123)  # the global generator plays no part
    second = PSMLayer(
        40, 24, 0.3, initial_weight_matrix=target, palm_settings=settings, nb_matrices=3
    )
    assert torch.equal(first.to_dense(), second.to_dense())
    assert first.fit.relative_error == pytest.approx(relative_error(first, target), rel=1e-5)
    assert first.nb_weight_parameters == first.weight_budget
    other_seed = PSMLayer(
        40, 24, 0.3, initial_weight_matrix=target, palm_settings=settings, nb_matrices=3, seed=1
    )
    assert other_seed.nb_weight_parameters == first.nb_weight_parameters


def test_fixed_split_and_single_factor():
    target = np.random.default_rng(2).standard_normal((30, 30))
    layer = PSMLayer(30, 30, 0.5, initial_weight_matrix=target, nnz_split=(3, 1))
    assert [f.nnz for f in layer.factors] == [338, 112]  # 450 values split 3:1, rounded
    assert all(s.nonzeros == (338, 112) for s, _ in layer.fit.tried)
    # one factor: the best sparse approximation keeps the largest entries
    single = PSMLayer(30, 30, 0.25, initial_weight_matrix=target, nb_matrices=1)
    kept = np.abs(target) >= np.sort(np.abs(target).ravel())[-225]
    np.testing.assert_allclose(single.to_dense().detach().numpy(), target * kept, atol=1e-5)


def test_sparse_matrix_times_scaled_permutation_is_recovered():
    # Exactly a product of two sparse factors, without Hadamard's ties: found by the split
    # "everything to the first factor".
    rng = np.random.default_rng(0)
    first = np.where(rng.random((40, 40)) < 0.15, rng.standard_normal((40, 40)), 0.0)
    np.fill_diagonal(first, rng.standard_normal(40) + 3)
    second = np.eye(40)[rng.permutation(40)] * rng.choice([-2.0, 2.0], size=40)
    target = first @ second
    share = ((first != 0).sum() + 40) / 1600
    with default_dtype(torch.float64):
        layer = PSMLayer(40, 40, share, initial_weight_matrix=target)
    assert relative_error(layer, target) <= 1e-4


@pytest.mark.parametrize("k", [4, pytest.param(6, marks=pytest.mark.slow)])
def test_hadamard_with_signs_and_scale_is_recovered(k):
    n = 2**k
    signs = np.random.default_rng(k).choice([-1.0, 1.0], size=n)
    target = 3.0 * scipy.linalg.hadamard(n) * signs[None, :]
    layer = PSMLayer(n, n, 2 * k / n, initial_weight_matrix=target, nb_matrices=k)
    assert relative_error(layer, target) <= 1e-4


def test_bad_settings_and_projections_are_rejected():
    with pytest.raises(TypeError, match="palm_settings must be"):
        PSMLayer(16, 16, 0.5, initial_weight_matrix=np.eye(16), palm_settings={"max_sweeps": 3})
    with pytest.raises(ValueError, match="projection must be 'global' or 'rowcol'"):
        project(torch.eye(3), 2, "diagonal")


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.05, 0.2])
def test_fit_stays_within_budget_when_row_column_projections_win(share):
    # A smooth rectangular kernel, where the row/column mode wins the search. Its refinement
    # once kept the supports of an unfinished continuation (and grew row/column supports):
    # 256 x 512 at share 0.1 came out with 17,135 nonzeros for a budget of 13,107.
    x, y = np.linspace(0, 1, 128), np.linspace(0, 1, 64)
    target = 1.0 / (1.0 + 50.0 * np.abs(y[:, None] - x[None, :]))
    layer = PSMLayer(128, 64, share, use_bias=False, initial_weight_matrix=target)
    assert layer.fit.strategy.projection == "rowcol"  # regression figure: the mode the search picks
    assert layer.nb_weight_parameters <= layer.weight_budget
    singular_values = np.linalg.svd(target, compute_uv=False)
    rank = layer.weight_budget // (128 + 64)  # truncated SVD with the same budget
    low_rank = np.sqrt((singular_values[rank:] ** 2).sum() / (singular_values**2).sum())
    assert relative_error(layer, target) < low_rank


def test_fit_psm_returns_the_factors_the_layer_holds():
    target = np.random.default_rng(5).standard_normal((12, 18))
    settings = PALMSettings(max_sweeps=100, threads=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = fit_psm(torch.from_numpy(target), 60, settings=settings)
        assert torch.get_num_threads() == 2  # the fit ran on one thread, then restored two
    finally:
        torch.set_num_threads(previous)
    assert [tuple(f.shape) for f in result.factors] == [(12, 12), (12, 18)]
    assert sum(int(support.sum()) for support in result.supports) == 60
    for factor, support in zip(result.factors, result.supports, strict=True):
        assert not factor[~support].any()
    product = (result.factors[0] @ result.factors[1]).numpy()
    error = np.linalg.norm(product - target) / np.linalg.norm(target)
    assert result.relative_error == pytest.approx(error, rel=1e-12) and error < 1
    with default_dtype(torch.float64):
        layer = PSMLayer(
            18, 12, 60 / 216, initial_weight_matrix=target, palm_settings=settings, use_bias=False
        )
    np.testing.assert_allclose(layer.to_dense().detach().numpy(), product, rtol=0, atol=1e-12)


def test_fit_psm_rejects_bad_arguments():
    target = np.eye(6)
    with pytest.raises(ValueError, match="matrix must be a 2-D array or tensor"):
        fit_psm(np.ones(3), 5)
    with pytest.raises(ValueError, match="budget must be a positive integer, got 0"):
        fit_psm(target, 0)
    with pytest.raises(ValueError, match="nonzeros must hold at most budget=10 in all, got 12"):
        fit_psm(target, 10, nonzeros=[6, 6])
    with pytest.raises(ValueError, match=r"factor_shapes\[0\] must have 6 rows"):
        fit_psm(target, 10, factor_shapes=[[5, 6]])
    with pytest.raises(TypeError, match="settings must be a structurednets_psm.PALMSettings"):
        fit_psm(target, 12, settings={"max_sweeps": 3})
