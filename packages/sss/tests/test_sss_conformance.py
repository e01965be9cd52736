import pytest
from hypothesis import strategies as st

from structurednets.testing import ConformanceCase, conformance_checks

CASE = ConformanceCase(
    "sss",
    option_strategies={
        "nb_stages": st.integers(1, 12),
        "state_dim": st.one_of(st.integers(0, 5), st.lists(st.integers(0, 4), max_size=6)),
        "anticausal_state_dim": st.integers(0, 5),
    },
)

# Checks that take seconds each (processes, compilation, many hypothesis examples).
SLOW = {
    "distributed_training",
    "torch_compile",
    "random_valid_arguments",
    "random_invalid_arguments",
}


@pytest.mark.parametrize(
    "check",
    [
        pytest.param(check, id=str(check), marks=[pytest.mark.slow] if str(check) in SLOW else [])
        for check in conformance_checks()
    ],
)
def test_conformance(check):
    check(CASE)
