import numpy as np
import pytest
import torch
from ldr_targets import generated

from structurednets.numerics import relative_error
from structurednets.testing import best_low_rank_error as low_rank_error
from structurednets.testing import smooth_kernel
from structurednets_ldr import (
    LDRLayer,
    displacement_rank_for,
    fit_ldr,
)


@pytest.mark.slow  # a 256 x 256 fit
def test_toeplitz_kernel_256_beats_low_rank_with_the_same_budget():
    """1 / (1 + |i - j|), 256 x 256, share 0.1: low rank with the same budget (rank 12)
    has relative error 0.645; shift operators represent Toeplitz matrices exactly."""
    target = smooth_kernel(256, 256)
    budget_rank = int(0.1 * 256 * 256) // (2 * 256)
    assert low_rank_error(target, budget_rank) == pytest.approx(0.645, abs=5e-4)
    layer = LDRLayer(256, 256, 0.1, initial_weight_matrix=target)
    assert layer.displacement_rank == 9
    assert layer.nb_weight_parameters <= layer.weight_budget
    assert relative_error(layer.to_dense(), target) < 1e-6  # float32 parameters
    assert layer.fit_relative_error < 1e-12  # float64 fit


def test_rectangular_toeplitz_and_hankel_are_exact():
    """For out != in, m = min(out, in) Krylov columns and nilpotent shifts represent every
    Toeplitz (and Hankel) matrix with displacement rank 2."""
    rng = np.random.default_rng(0)
    column, row = rng.standard_normal(96), rng.standard_normal(64)
    i, j = np.arange(96)[:, None], np.arange(64)[None, :]
    toeplitz = np.where(i >= j, column[np.clip(i - j, 0, None)], row[np.clip(j - i, 0, None)])
    hankel = rng.standard_normal(96 + 64)[i + j]
    for target in (toeplitz, hankel):
        fit = fit_ldr(torch.from_numpy(target), 2, 64)
        assert fit.relative_error < 1e-12, fit.start


@pytest.mark.slow  # a 256 x 256 fit
def test_generated_from_shift_operators_is_recovered_exactly():
    rank = displacement_rank_for(256, 256, 0.1)
    target = generated(256, rank, noise=0.0, seed=0)
    fit = fit_ldr(target, rank, 256)
    assert fit.relative_error < 1e-12
    assert fit.start == "cyclic"  # the generating operators are a start: found at once


@pytest.mark.parametrize("seed", [0, 2])
def test_generated_from_perturbed_operators_is_fitted_to_1e_3(seed):
    """Operators that are not among the starts (each nonzero of the cyclic shifts perturbed
    by 1% noise): estimated from the displacement, then refined."""
    rank = displacement_rank_for(64, 64, 0.25)
    target = generated(64, rank, noise=0.01, seed=seed)
    fit = fit_ldr(target, rank, 64)
    assert fit.relative_error <= 1e-3
    assert "estimated" in fit.start


@pytest.mark.slow  # four estimations, some through several continuations
@pytest.mark.parametrize(("noise", "seed"), [(0.05, 0), (0.1, 1), (0.1, 2), (0.15, 7)])
def test_strongly_perturbed_operators_are_identified(noise, seed):
    """5%, 10% and 15% noise on the shifts: the L-BFGS estimation of the displacement
    stopped at relative errors of 3.7e-3, 0.16, 2.5e-3 and 0.10 for these;
    Levenberg-Marquardt on the displacement's tail recovers the operators (up to
    ``(c A, B / c)``, which leaves ``W`` unchanged). The last one stalls in the first
    sequence (rank 3 r, then 2 r) and is identified by the next (2 r directly)."""
    rank = displacement_rank_for(64, 64, 0.25)
    target, A_bands, B_bands = generated(64, rank, noise, seed, operators=True)
    fit = fit_ldr(target, rank, 64)
    assert fit.relative_error <= 1e-3
    # regression figures: which continuation of the estimation identified them
    assert fit.start == ("cyclic, estimated" if noise > 0.1 else "cyclic, estimated via rank 15")
    scale = torch.dot(fit.A_bands.flatten(), A_bands.flatten()) / fit.A_bands.square().sum()
    assert torch.linalg.norm(scale * fit.A_bands - A_bands) <= 1e-8 * torch.linalg.norm(A_bands)
    assert torch.linalg.norm(fit.B_bands / scale - B_bands) <= 1e-8 * torch.linalg.norm(B_bands)


@pytest.mark.slow  # two rectangular estimations
@pytest.mark.parametrize(("out_dim", "in_dim", "seed"), [(96, 64, 2), (64, 96, 0)])
def test_perturbed_operators_of_a_rectangular_target_are_identified(out_dim, in_dim, seed):
    """With m = min(out, in) < n the nilpotent shifts fit better than the cyclic ones, but
    only from the cyclic ones does the estimation reach a zero of the displacement's tail
    (the estimation is started from the operators nearest to one; the L-BFGS estimation
    stopped at 7.1e-3 and 1.4e-2 for these)."""
    rank = displacement_rank_for(in_dim, out_dim, 0.25)
    target = generated(in_dim, rank, 0.05, seed, out_dim=out_dim)
    fit = fit_ldr(target, rank, min(out_dim, in_dim))
    assert fit.relative_error <= 1e-3
    assert fit.start.startswith("cyclic, estimated")


def test_random_target_is_never_worse_than_low_rank_of_the_displacement_rank():
    rng = np.random.default_rng(1)
    target = rng.standard_normal((40, 30)) * np.logspace(0, -2, 30)
    rank = 2
    fit = fit_ldr(torch.from_numpy(target), rank, 30, max_evaluations=100)
    assert fit.relative_error <= low_rank_error(target, rank) + 1e-12


def test_fit_is_deterministic_and_respects_given_operators():
    target = torch.from_numpy(np.random.default_rng(2).standard_normal((24, 20)))
    first = fit_ldr(target, 2, 20, max_evaluations=60)
    second = fit_ldr(target, 2, 20, max_evaluations=60)
    for a, b in zip(
        (first.A_bands, first.B_bands, first.G, first.H),
        (second.A_bands, second.B_bands, second.G, second.H),
        strict=True,
    ):
        assert torch.equal(a, b)
    A, B = torch.zeros(24, 24), torch.zeros(20, 20)
    layer = LDRLayer(
        20, 24, 1.0, initial_weight_matrix=target, operators=(A, B), fit_max_evaluations=5
    )
    assert (
        layer.fit_relative_error <= low_rank_error(target.numpy(), layer.displacement_rank) + 1e-6
    )


def test_zero_target():
    layer = LDRLayer(16, 16, 1.0, initial_weight_matrix=np.zeros((16, 16)))
    assert not layer.to_dense().any()


def test_fit_arguments_are_checked_and_krylov_columns_default_to_the_smaller_side():
    with pytest.raises(ValueError, match=r"matrix must be 2-D \(out, in\), got shape \(3,\)"):
        fit_ldr(torch.ones(3), 1)
    with pytest.raises(ValueError, match="displacement_rank must be a positive integer, got 0"):
        fit_ldr(torch.ones(8, 8), 0)
    i, j = np.arange(12)[:, None], np.arange(10)[None, :]
    toeplitz = np.random.default_rng(4).standard_normal(22)[i - j + 9]  # m = 10 by default
    assert fit_ldr(toeplitz, 2).relative_error < 1e-12
