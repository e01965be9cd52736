import pytest

from structurednets.testing import ConformanceCase, conformance_checks

CASE = ConformanceCase("sss")


@pytest.mark.parametrize("check", conformance_checks(), ids=str)
def test_conformance(check):
    check(CASE)
