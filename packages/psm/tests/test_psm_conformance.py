import pytest

from structurednets.testing import ConformanceCase, conformance_checks

CASE = ConformanceCase("psm")


@pytest.mark.parametrize("check", conformance_checks(), ids=str)
def test_conformance(check):
    check(CASE)
