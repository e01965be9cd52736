"""The LDR fit of matrices that are no LDR matrices: recognised early, fitted in seconds."""

import numpy as np
import pytest
import torch
from ldr_targets import generated

from structurednets.testing import best_low_rank_error as low_rank_error
from structurednets_ldr import displacement_rank_for, fit_ldr
from structurednets_ldr.fit import FitProblem, not_an_ldr_matrix, score_starts
from structurednets_ldr.fit.starts import power_times, shift_starts
from structurednets_ldr.operators import bands_to_dense, cyclic_shift_bands


@pytest.mark.parametrize("n", [1, 2, 3, 17])
def test_power_times_is_the_dense_matrix_power(n):
    generator = torch.Generator().manual_seed(n)
    bands = 0.6 * torch.randn(3, n, generator=generator, dtype=torch.float64)
    X = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    expected = torch.linalg.matrix_power(bands_to_dense(bands), 11) @ X
    torch.testing.assert_close(power_times(bands, X, 11), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("down", [True, False])
@pytest.mark.parametrize("corner", [0.0, 1.0, -1.0, 0.5])
def test_power_times_of_shifts_is_the_dense_matrix_power(down, corner):
    """Shifts (every start's operators) take the rolled path; it must equal the stencil's."""
    n = 7
    bands = cyclic_shift_bands(n, corner, down=down, dtype=torch.float64)
    X = torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for power in (0, 1, 3, n, n + 2, 3 * n + 1):
        expected = torch.linalg.matrix_power(bands_to_dense(bands), power) @ X
        torch.testing.assert_close(power_times(bands, X, power), expected, rtol=0, atol=1e-12)


def _problem(matrix: torch.Tensor, share: float) -> tuple[FitProblem, list]:
    out_dim, in_dim = matrix.shape
    rank = displacement_rank_for(in_dim, out_dim, share)
    problem = FitProblem(matrix, rank, min(out_dim, in_dim), torch.linalg.norm(matrix), 4)
    scored = score_starts(problem, shift_starts(out_dim, in_dim))
    return problem, [item for item in scored if item.name != "low-rank"]


@pytest.mark.parametrize("noise", [0.0, 0.05, 0.1])
def test_ldr_matrices_with_perturbed_shifts_are_recognised(noise):
    assert not not_an_ldr_matrix(*_problem(generated(64, 4, noise, 0), 0.3))


def test_gaussian_and_low_rank_matrices_are_not_ldr_matrices():
    rng = np.random.default_rng(0)
    gaussian = torch.from_numpy(rng.standard_normal((64, 48)))
    assert not_an_ldr_matrix(*_problem(gaussian, 0.3))
    low_rank = torch.from_numpy(rng.standard_normal((64, 12)) @ rng.standard_normal((12, 64)))
    assert not_an_ldr_matrix(*_problem(low_rank, 0.3))


def test_a_matrix_that_is_no_ldr_matrix_gets_a_short_fit_better_than_low_rank():
    rng = np.random.default_rng(1)
    target = (
        rng.standard_normal((96, 80))
        @ np.diag(0.97 ** np.arange(80))
        @ rng.standard_normal((80, 80))
    )
    rank = displacement_rank_for(80, 96, 0.2)
    fit = fit_ldr(torch.from_numpy(target), rank, max_evaluations=400)
    assert fit.start == "low-rank, small cyclic operators"
    assert 1 < fit.nb_evaluations <= 100
    assert fit.relative_error < low_rank_error(target, rank) - 1e-3
