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


@pytest.mark.parametrize("check", conformance_checks(), ids=str)
def test_conformance(check):
    check(CASE)
