"""Conformance kit: the checks every structure must pass.

In a plugin's test suite::

    import pytest
    from structurednets.testing import ConformanceCase, conformance_checks

    CASE = ConformanceCase("lowrank")

    @pytest.mark.parametrize("check", conformance_checks(), ids=str)
    def test_conformance(check):
        check(CASE)

or, in one call that reports every failure at once, ``check_structure("lowrank")``.
"""

from structurednets.testing.case import Check, ConformanceCase, default_dtype
from structurednets.testing.conformance import check_structure, conformance_checks

__all__ = ["Check", "ConformanceCase", "check_structure", "conformance_checks", "default_dtype"]
