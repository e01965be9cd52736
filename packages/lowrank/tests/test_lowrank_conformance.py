import pytest
from hypothesis import strategies as st

from structurednets.testing import ConformanceCase, conformance_checks

CASE = ConformanceCase("lowrank", option_strategies={"rank": st.integers(1, 6)})


@pytest.mark.parametrize("check", conformance_checks(), ids=str)
def test_conformance(check):
    check(CASE)
