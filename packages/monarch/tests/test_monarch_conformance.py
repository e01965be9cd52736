import pytest
from hypothesis import strategies as st

from structurednets.testing import ConformanceCase, conformance_checks

CASE = ConformanceCase(
    "monarch",
    option_strategies={
        "nb_blocks": st.one_of(st.integers(1, 6), st.tuples(st.integers(1, 6), st.integers(1, 6))),
        "rank": st.integers(1, 4),
    },
)


@pytest.mark.parametrize("check", conformance_checks(), ids=str)
def test_conformance(check):
    check(CASE)
