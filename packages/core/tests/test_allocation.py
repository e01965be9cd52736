"""Global allocation: the knapsack against brute force, and compress(allocation="global")
on the test-only structures (fits at grid shares, a choice across structures)."""

import itertools

import numpy as np
import pytest
import torch
from full_structure import FullLayer, full_nb_weight_parameters
from torch import nn

import structurednets
from structurednets import compress
from structurednets.allocation import Candidate, allocate, grid_shares, share_for_weights
from structurednets.validation import weight_budget


@pytest.fixture
def full_structure():
    structure = structurednets.register("full", FullLayer, full_nb_weight_parameters)
    yield structure
    structurednets.unregister("full")


def convex_curve(rng, nb_points, step):
    """Errors falling at a falling rate: (weights, squared error) of a convex curve."""
    drops = np.sort(rng.uniform(0.01, 1.0, nb_points))[::-1]
    errors = 1.0 - np.cumsum(drops) / drops.sum() * 0.99
    return [Candidate("x", step * (k + 1), float(e), 0.0) for k, e in enumerate(errors)]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_matches_brute_force_on_convex_curves_of_equal_steps(seed):
    rng = np.random.default_rng(seed)
    curves = [convex_curve(rng, 6, 10) for _ in range(4)]
    budget = int(rng.integers(40, 240))
    choices, used = allocate(curves, budget)
    assert used == sum(c.nb_weights for c in choices) <= budget
    best = min(
        sum(c.squared_error for c in combo)
        for combo in itertools.product(*curves)
        if sum(c.nb_weights for c in combo) <= budget
    )
    assert sum(c.squared_error for c in choices) == pytest.approx(best, abs=1e-12)


def test_allocation_skips_dominated_forms_and_never_exceeds_the_budget():
    worse = Candidate("x", 50, 0.9, 0.0)  # more weights than the first, no better
    curve = [Candidate("x", 10, 0.5, 0.0), worse, Candidate("x", 60, 0.1, 0.0)]
    choices, used = allocate([curve], 55)
    assert choices == [curve[0]] and used == 10
    choices, used = allocate([curve], 60)
    assert choices == [curve[2]] and used == 60


def test_smallest_forms_over_the_budget_keep_the_largest_dense():
    small, large = Candidate("x", 10, 0.5, 0.0), Candidate("x", 40, 0.5, 0.0)
    choices, used = allocate([[small], [large], []], 30)
    assert choices == [small, None, None] and used == 10


def test_share_for_weights_gives_exactly_that_budget():
    for count in (1, 17, 383, 384):
        assert weight_budget(16, 24, share_for_weights(count, 16, 24)) == count
    assert grid_shares(0.4, 0.05, 1.0) == [0.1, 0.2, 0.4, 0.8, 1.0]


def three_layers():
    """Layer 0 diagonal, layer 1 dense random, layer 2 diagonal plus a little noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.arange(1.0, 17.0)))
        model[2].weight.copy_(torch.diag(torch.ones(16)) + 0.01 * torch.randn(16, 16))
    return model


def test_global_spends_the_budget_where_it_lowers_the_error_most(
    diagonal_structure, full_structure
):
    model = three_layers()
    _, uniform = compress(model, ["full", "diagonal"], 0.5)
    assert [layer.structure for layer in uniform.layers] == ["diagonal"] * 3  # full needs 1.0
    lines = []
    _, report = compress(
        model, ["full", "diagonal"], 0.5, allocation="global", progress=lines.append
    )
    # 384 weights: one full layer (256) and two diagonals (32); the dense one gains the most
    assert [layer.structure for layer in report.layers] == ["diagonal", "full", "diagonal"]
    assert [layer.nb_params_share for layer in report.layers][1] == 1.0
    assert report.weight_budget == 384 and report.allocated_weights == 288
    errors = [layer.relative_error**2 for layer in report.layers]
    assert sum(errors) < sum(layer.relative_error**2 for layer in uniform.layers) - 0.5
    assert report.layers[1].relative_error == pytest.approx(0, abs=1e-6)
    assert lines[0] == "[allocation 1/3] 0: 5 forms"  # diagonal at 4 shares, full at 1.0
    table = str(report)
    assert "share" in table.splitlines()[0] and "global allocation: 288 of 384 weights" in table
    assert report.allocation == "global" and report.allocation_seconds > 0


def test_layers_whose_smallest_form_does_not_fit_stay_dense_with_the_reason(full_structure):
    compressed, report = compress(three_layers(), "full", 0.5, allocation="global")
    assert len(report.layers) == 1 and len(report.skipped) == 2
    assert all("smallest forms of all layers exceed the budget" in s.reason for s in report.skipped)
    assert sum(isinstance(m, nn.Linear) for m in compressed) == 2


def test_max_share_bounds_every_layer(diagonal_structure, full_structure):
    _, report = compress(
        three_layers(), ["full", "diagonal"], 0.5, allocation="global", max_share=0.9
    )
    assert [layer.structure for layer in report.layers] == ["diagonal"] * 3
    _, report = compress(three_layers(), "full", 0.5, allocation="global", max_share=0.9)
    assert not report.layers
    assert "no form of full fits between" in report.skipped[0].reason


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"allocation": "best"}, "allocation must be 'uniform' or 'global', got 'best'"),
        ({"min_share": 0.1}, "min_share and max_share need allocation='global'"),
        ({"allocation": "global", "min_share": 0.6}, "min_share <= nb_params_share <= max_share"),
        ({"allocation": "global", "max_share": 1.5}, "max_share must be in (0, 1]"),
    ],
)
def test_bad_allocation_arguments(diagonal_structure, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compress(three_layers(), "diagonal", 0.5, **kwargs)


def test_output_sensitivities_match_the_exact_expectation():
    """Two linear layers: dF/dY is the identity for the last, B for the first, so the
    Hutchinson estimate must average to ||Y||^2 / (n d) * n * ||J||_F^2 per batch."""
    from structurednets.calibration_hooks import output_sensitivities
    from structurednets.linear_modules import linear_view

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.Linear(7, 6, bias=False))
    batches = [torch.randn(8, 5) for _ in range(200)]
    layers = [(name, module, linear_view(module)) for name, module in model.named_children()]
    sums = output_sensitivities(model, layers, batches)
    with torch.no_grad():
        first = [model[0](b) for b in batches]
        last = [model(b) for b in batches]
        B = model[1].weight.double()
    exact_first = sum(float(y.double().pow(2).mean()) * 8 * float(B.pow(2).sum()) for y in first)
    exact_last = sum(float(y.double().pow(2).mean()) * 8 * 6 for y in last)
    assert sums["0"] == pytest.approx(exact_first, rel=0.1)
    assert sums["1"] == pytest.approx(exact_last, rel=0.1)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


class TwoBranches(nn.Module):
    """``y = first(x) + second(x)`` with the ``quiet`` branch scaled by 1e-3: its errors
    barely reach ``y``."""

    def __init__(self, quiet):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second, self.quiet = nn.Linear(16, 16), nn.Linear(16, 16), quiet

    def forward(self, x):
        scale = {"first": (1e-3, 1.0), "second": (1.0, 1e-3)}[self.quiet]
        return scale[0] * self.first(x) + scale[1] * self.second(x)


def test_calibrated_global_allocation_weighs_layers_by_their_effect_on_the_output(
    diagonal_structure, full_structure
):
    batches = [torch.randn(32, 16) for _ in range(4)]
    for quiet, loud in (("first", "second"), ("second", "first")):
        _, report = compress(
            TwoBranches(quiet), ["full", "diagonal"], 0.6, calibration=batches, allocation="global"
        )
        structures = {layer.name: layer.structure for layer in report.layers}
        assert structures == {quiet: "diagonal", loud: "full"}
