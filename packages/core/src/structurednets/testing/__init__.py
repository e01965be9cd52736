"""Conformance kit: the checks every structure must pass.

In a plugin's test suite::

    import pytest
    from structurednets.testing import ConformanceCase, conformance_checks

    CASE = ConformanceCase("lowrank")

    @pytest.mark.parametrize("check", conformance_checks(), ids=str)
    def test_conformance(check):
        check(CASE)

or, in one call that reports every failure at once, ``check_structure("lowrank")``.

Helpers that structures' tests share: :func:`smooth_kernel`, :func:`best_low_rank_error`,
:func:`layer_relative_error`, :func:`relative_error`, :func:`torch_threads`,
:func:`default_dtype`.
"""

from structurednets.numerics import relative_error, torch_threads
from structurednets.testing.case import Check, ConformanceCase, default_dtype
from structurednets.testing.conformance import check_structure, conformance_checks
from structurednets.testing.matrices import best_low_rank_error, layer_relative_error, smooth_kernel

__all__ = [
    "Check",
    "ConformanceCase",
    "best_low_rank_error",
    "check_structure",
    "conformance_checks",
    "default_dtype",
    "layer_relative_error",
    "relative_error",
    "smooth_kernel",
    "torch_threads",
]
