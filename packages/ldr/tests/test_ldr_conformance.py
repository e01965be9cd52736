import pytest

from structurednets.testing import ConformanceCase, conformance_checks

# The operators alone hold 3 (in + out) scalars, so no LDR layer fits a 7 x 5 at any share
# (it needs 4 (in + out) <= share * in * out): gradcheck uses the smallest layer that does.
CASE = ConformanceCase("ldr", gradcheck_shape=(12, 10), gradcheck_share=1.0)


@pytest.mark.parametrize("check", conformance_checks(), ids=str)
def test_conformance(check):
    check(CASE)
