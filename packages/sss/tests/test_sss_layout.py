"""Layouts: the sizes a layer records, the exact-size options that rebuild them, nb_states."""

import numpy as np
import pytest
import torch

import structurednets
from structurednets import BudgetTooSmallError
from structurednets.testing import default_dtype
from structurednets_sss import SSSLayer, SSSSizes, SSSSystem, fit_sss, sss_nb_weight_parameters

# Ragged blocks, and a causal state (7) above its cap (n_0 = 6): not a minimal realisation.
RAGGED = ((6, 2, 8), (4, 6, 4), (7, 1), (1, 3))


def test_layout_of_a_ragged_system_rebuilds_it_exactly(random_stage_matrices, weight_count):
    with default_dtype(torch.float64):
        layer = SSSLayer(16, 14, 1.0, system=SSSSystem(**random_stage_matrices(*RAGGED)))
    assert layer.layout.sizes == {
        "input_sizes": (6, 2, 8),
        "output_sizes": (4, 6, 4),
        "causal_dims": (7, 1),
        "anticausal_dims": (1, 3),
    }
    with default_dtype(torch.float64):
        twin = structurednets.create("sss", layout=layer.layout)
    assert twin.sizes == layer.sizes == SSSSizes(*RAGGED)
    expected = weight_count(*RAGGED) + 14
    assert twin.get_nb_parameters() == layer.get_nb_parameters() == expected
    assert structurednets.nb_parameters("sss", layout=layer.layout) == expected
    twin.load_state_dict(layer.state_dict())
    U = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(twin(U), layer(U))


def test_constructor_takes_a_fitted_layers_sizes(weight_count):
    target = np.random.default_rng(1).standard_normal((40, 56))
    fitted = SSSLayer(56, 40, 0.3, initial_weight_matrix=target)
    rebuilt = SSSLayer(56, 40, 0.3, **fitted.layout_sizes())
    assert rebuilt.sizes == fitted.sizes
    assert rebuilt.nb_weight_parameters == weight_count(*fitted.layout_sizes().values())
    assert sss_nb_weight_parameters(56, 40, 0.3, **fitted.layout_sizes()) == weight_count(
        *fitted.layout_sizes().values()
    )
    rebuilt.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(rebuilt.to_dense(), fitted.to_dense(), rtol=0, atol=0)


def test_fit_with_exact_sizes_pads_states_above_the_hankel_rank(weight_count):
    """Two stages of 10 x 12 blocks whose off-diagonal blocks have rank 2: states of 4 recover
    W exactly and carry two zero components; states of 1 give the Eckart-Young error."""
    rng = np.random.default_rng(2)
    target = rng.standard_normal((20, 24))
    target[10:, :12] = rng.standard_normal((10, 2)) @ rng.standard_normal((2, 12))
    target[:10, 12:] = rng.standard_normal((10, 2)) @ rng.standard_normal((2, 12))
    exact = {"input_sizes": (12, 12), "output_sizes": (10, 10), "causal_dims": (4,)}
    with default_dtype(torch.float64):
        layer = SSSLayer(24, 20, 1.0, initial_weight_matrix=target, anticausal_dims=(4,), **exact)
        assert layer.sizes == SSSSizes((12, 12), (10, 10), (4,), (4,))
        assert layer.nb_weight_parameters == weight_count((12, 12), (10, 10), (4,), (4,))
        np.testing.assert_allclose(layer.to_dense().detach().numpy(), target, atol=1e-12)
        fitted = fit_sss(target, 480, **dict(exact, causal_dims=(1,)), anticausal_dims=(1,))
    lower = np.linalg.svd(target[10:, :12], compute_uv=False)
    upper = np.linalg.svd(target[:10, 12:], compute_uv=False)
    optimum = np.sum(lower[1:] ** 2) + np.sum(upper[1:] ** 2)
    assert fitted.squared_error == pytest.approx(optimum, rel=1e-10)
    dense = fitted.system.to_dense().numpy()
    assert np.sum((dense - target) ** 2) == pytest.approx(optimum, rel=1e-10)


def test_exact_sizes_over_the_budget_are_refused(random_stage_matrices):
    with pytest.raises(BudgetTooSmallError, match="the given sizes"):
        fit_sss(
            np.ones((14, 16)),
            100,
            **SSSLayer(
                16, 14, 1.0, system=SSSSystem(**random_stage_matrices(*RAGGED))
            ).layout_sizes(),
        )
    with pytest.raises(BudgetTooSmallError, match="2 stages"):
        SSSLayer(
            8,
            6,
            0.5,
            input_sizes=(4, 4),
            output_sizes=(3, 3),
            causal_dims=(3,),
            anticausal_dims=(3,),
        )


def test_nb_states_is_another_name_for_nb_stages():
    assert SSSLayer(64, 48, 0.5, nb_states=4).sizes == SSSLayer(64, 48, 0.5, nb_stages=4).sizes
    assert SSSLayer(64, 48, 0.5, nb_stages=4, nb_states=4).nb_stages == 4
    assert sss_nb_weight_parameters(64, 48, 0.5, nb_states=6) == sss_nb_weight_parameters(
        64, 48, 0.5, nb_stages=6
    )
    target = np.random.default_rng(3).standard_normal((48, 64))
    assert fit_sss(target, 1500, nb_states=3).sizes.nb_stages == 3
    with pytest.raises(ValueError, match="nb_stages=4 and nb_states=8"):
        SSSLayer(64, 48, 0.5, nb_stages=4, nb_states=8)
    with pytest.raises(ValueError, match="nb_stages must be at most"):
        SSSLayer(64, 48, 0.5, nb_stages=49)


GOOD = {"input_sizes": (3, 5), "output_sizes": (4, 2), "causal_dims": (1,), "anticausal_dims": (2,)}


@pytest.mark.parametrize(
    "change, error, fragments",
    [
        ({"causal_dims": None}, ValueError, ["go together", "missing: causal_dims"]),
        ({"input_sizes": (3, 4)}, ValueError, ["input_sizes", "summing to input_dim = 8", "sum 7"]),
        ({"output_sizes": (6,)}, ValueError, ["output_sizes", "as many stages", "(2)"]),
        ({"anticausal_dims": (1, 1)}, ValueError, ["anticausal_dims", "K - 1 = 1", "got 2"]),
        ({"causal_dims": (-1,)}, TypeError, ["causal_dims", "integers >= 0", "[-1]"]),
        ({"input_sizes": (0, 8)}, TypeError, ["input_sizes", "integers >= 1"]),
        ({"output_sizes": 6}, TypeError, ["output_sizes", "got 6"]),
        ({"nb_stages": 2}, ValueError, ["do not pass nb_stages"]),
        ({"state_dim": 1}, ValueError, ["do not pass state_dim"]),
    ],
)
def test_bad_exact_sizes_name_the_option(change, error, fragments):
    with pytest.raises(error) as info:
        SSSLayer(8, 6, 1.0, **{**GOOD, **change})
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_a_system_excludes_the_exact_sizes(random_stage_matrices):
    with pytest.raises(ValueError, match="do not pass input_sizes, output_sizes"):
        SSSLayer(
            16,
            14,
            1.0,
            system=SSSSystem(**random_stage_matrices(*RAGGED)),
            **SSSSizes(*RAGGED).layout_sizes(),
        )


def test_the_fit_restores_the_thread_count():
    before = torch.get_num_threads()
    fit_sss(np.random.default_rng(4).standard_normal((20, 20)), 200)
    assert torch.get_num_threads() == before
