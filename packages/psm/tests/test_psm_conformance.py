import pytest
from hypothesis import strategies as st

from structurednets.testing import ConformanceCase, conformance_checks

CASE = ConformanceCase(
    "psm",
    option_strategies={
        "nb_matrices": st.integers(1, 4),
        "inner_dim": st.integers(1, 48),
        "seed": st.integers(0, 3),
    },
)


# distributed, compile, hypothesis and fitting checks (the layout checks fit too); the layout
# tests of test_psm_layer.py keep save/load in the fast loop
SLOW = {
    "distributed_training",
    "torch_compile",
    "random_valid_arguments",
    "random_invalid_arguments",
    "initial_weight_matrix",
    "approximation_robustness",
    "layout_round_trip",
    "save_and_load",
}


@pytest.mark.parametrize(
    "check",
    [
        pytest.param(c, marks=pytest.mark.slow) if c.name in SLOW else c
        for c in conformance_checks()
    ],
    ids=str,
)
def test_conformance(check):
    check(CASE)
