"""pytest plugin (entry point ``pytest11``): the ``slow`` marker, set on the kit's slow checks.

Every package's suite then runs fast with ``pytest -m "not slow"`` and completely by default,
without each plugin's tests marking the kit's checks one by one.
"""

from __future__ import annotations

import pytest

from structurednets.testing.case import Check

#: Kit checks that take seconds per structure (processes, code generation, many draws).
SLOW_CHECKS = frozenset(
    {"distributed_training", "torch_compile", "random_valid_arguments", "random_invalid_arguments"}
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: seconds or more (processes, compilation, large fits); -m 'not slow' skips"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(p, Check) and p.name in SLOW_CHECKS for p in params.values()):
            item.add_marker(pytest.mark.slow)
