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


@pytest.mark.parametrize("check", conformance_checks(), ids=str)
def test_conformance(check):
    check(CASE)
