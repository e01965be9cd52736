"""Low rank's closed-form error curve and the global allocation it drives."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import structurednets
from structurednets import approximate, compress
from structurednets.allocation import share_for_weights
from structurednets.calibration import InputStatistics
from structurednets_lowrank import LRLayer


def decaying(shape, rate, seed):
    """A matrix with singular values rate**k (random singular vectors)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
    k = min(shape)
    return (u[:, :k] * rate ** np.arange(k)) @ v[:, :k].T


@pytest.mark.parametrize("calibrated", [False, True])
def test_curve_equals_the_fits_at_every_rank(calibrated):
    W = torch.from_numpy(decaying((20, 14), 0.8, 0))
    statistics = None
    if calibrated:
        X = torch.randn(200, 14, dtype=torch.float64) * torch.linspace(0.1, 2, 14)
        statistics = InputStatistics(14, damping=0.0).update(X)
    curve = LRLayer.error_curve(W, statistics, 14 * 20)
    assert [count for count, _ in curve] == [34 * r for r in range(1, 9)]  # 9 * 34 > 280
    for count, squared in curve:
        fitted = approximate(
            W, "lowrank", share_for_weights(count, 14, 20), inputs=statistics, dtype=torch.float64
        )
        error = fitted.output_relative_error if calibrated else fitted.relative_error
        assert fitted.layer.nb_weight_parameters == count
        assert error**2 == pytest.approx(squared, rel=1e-9, abs=1e-14)


def model_of_spectra(rates):
    model = nn.Sequential(*(nn.Linear(24, 24, bias=False) for _ in rates))
    with torch.no_grad():
        for k, (layer, rate) in enumerate(zip(model, rates, strict=True)):
            layer.weight.copy_(torch.from_numpy(decaying((24, 24), rate, k)))
    return model


def test_global_ranks_are_the_brute_force_optimum():
    """Equal shapes, so every rank step costs the same: the greedy choice is optimal."""
    rates = (0.3, 0.7, 0.95)
    model = model_of_spectra(rates)
    _, report = compress(model, "lowrank", 0.25, allocation="global")
    ranks = [layer.nb_parameters_after // 48 for layer in report.layers]
    assert sum(ranks) * 48 <= report.weight_budget == int(0.25 * 3 * 576)
    spectra = [rate ** (2 * np.arange(24)) for rate in rates]

    def total(combo):
        return sum(s[r:].sum() / s.sum() for s, r in zip(spectra, combo, strict=True))

    best = min(
        (c for c in itertools.product(range(1, 13), repeat=3) if sum(c) * 48 <= 432), key=total
    )
    assert total(ranks) == pytest.approx(total(best), rel=1e-9)
    assert ranks[0] < ranks[1] < ranks[2]  # the slowest decay gets the most
    _, uniform = compress(model, "lowrank", 0.25)
    assert sum(layer.relative_error**2 for layer in report.layers) < sum(
        layer.relative_error**2 for layer in uniform.layers
    )
    assert report.nb_parameters_after <= uniform.nb_parameters_before * 0.25


def test_global_with_calibration_and_min_share():
    torch.manual_seed(0)
    model = model_of_spectra((0.3, 0.9))
    batches = [torch.randn(64, 24) for _ in range(4)]
    _, report = compress(
        model, "lowrank", 0.3, calibration=batches, allocation="global", min_share=0.2
    )
    shares = [layer.nb_params_share for layer in report.layers]
    assert min(shares) >= 0.2 and report.allocated_weights <= report.weight_budget
    assert all(layer.output_relative_error is not None for layer in report.layers)
    # the allocation is a small part of the time: one SVD per layer
    assert report.allocation_seconds < report.seconds
    predicted = structurednets.nb_parameters("lowrank", 24, 24, shares[0], use_bias=False)
    assert predicted == report.layers[0].nb_parameters_after


def test_global_with_sequential_fits_the_allocated_ranks_to_the_compressed_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24)
    )
    batches = [torch.randn(32, 24) for _ in range(3)]
    options = {"calibration": batches, "allocation": "global"}
    _, at_once = compress(model, "lowrank", 0.3, **options)
    _, sequential = compress(model, "lowrank", 0.3, sequential=True, **options)
    # the same allocation (from the dense model's inputs), then each layer refitted to the
    # inputs the compressed layers before it give
    sizes = [layer.nb_parameters_after for layer in sequential.layers]
    assert sizes == [layer.nb_parameters_after for layer in at_once.layers]
    first, last = sequential.layers[0], sequential.layers[2]
    assert first.output_relative_error == pytest.approx(at_once.layers[0].output_relative_error)
    assert last.output_relative_error != pytest.approx(at_once.layers[2].output_relative_error)
