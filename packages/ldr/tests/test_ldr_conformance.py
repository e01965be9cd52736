import pytest

from structurednets.testing import ConformanceCase, conformance_checks

# The operators alone hold 3 (in + out) scalars, so no LDR layer fits a 7 x 5 at any share
# (it needs 4 (in + out) <= share * in * out): gradcheck uses the smallest layer that does.
CASE = ConformanceCase("ldr", gradcheck_shape=(12, 10), gradcheck_share=1.0)

# compile, distributed, hypothesis and many-fit checks: run by default, deselected by -m "not slow"
SLOW = {
    "approximation_robustness",
    "distributed_training",
    "random_invalid_arguments",
    "random_valid_arguments",
    "torch_compile",
}
CHECKS = [
    pytest.param(check, marks=pytest.mark.slow) if check.name in SLOW else check
    for check in conformance_checks()
]


@pytest.mark.parametrize("check", CHECKS, ids=str)
def test_conformance(check):
    check(CASE)
