import pytest
from hypothesis import strategies as st

from structurednets.testing import ConformanceCase, conformance_checks

# With the default min_block_size (16) the kit's small shapes would be single blocks (plain low
# rank); 4 makes them real H-matrices, so the kit exercises the partition and the buckets.
CASE = ConformanceCase(
    "hmat",
    options={"min_block_size": 4},
    option_strategies={
        "eta": st.floats(0.05, 20.0),
        "min_block_size": st.integers(1, 12),
    },
)


# Checks that take seconds (processes, compilation, many hypothesis examples): out of the fast loop.
SLOW_CHECKS = {"distributed_training", "torch_compile", "random_valid_arguments"}
CHECKS = [
    pytest.param(check, marks=pytest.mark.slow) if check.name in SLOW_CHECKS else check
    for check in conformance_checks()
]


@pytest.mark.parametrize("check", CHECKS, ids=str)
def test_conformance(check):
    check(CASE)
