"""The conformance kit: every check a registered structure must pass.

Each check is a function of a :class:`ConformanceCase` that raises ``AssertionError`` when the
structure breaks the contract of :class:`~structurednets.StructuredLayer`. A check added to
the list here applies to every structure whose test suite runs the kit.
"""

from __future__ import annotations

from typing import Any

from structurednets.testing.case import Check, CheckSkipped, ConformanceCase
from structurednets.testing.contract_checks import (
    check_bad_constructor_arguments,
    check_bad_inputs,
    check_budget_and_parameter_counts,
    check_constructor_signature,
    check_copy_and_serialisation,
    check_docstring_example,
    check_dtype_conversion,
    check_forward_matches_dense,
    check_gradients,
    check_initial_bias,
    check_initial_weight_matrix,
    check_no_bias,
    check_optimisers_reduce_loss,
    check_output_shapes,
    check_random_init_scale,
    check_registered,
    check_repr,
    check_state_dict_round_trip,
)
from structurednets.testing.cost_checks import check_cost_is_reported
from structurednets.testing.layout_checks import (
    check_layout_mismatch_is_refused,
    check_layout_round_trip,
    check_save_and_load,
)
from structurednets.testing.precision_checks import (
    check_autocast_compiles,
    check_cuda_precision,
    check_dtypes_and_autocast,
    check_reduced_precision_layers,
)
from structurednets.testing.scaling_checks import (
    check_output_variance,
    check_trains_from_scratch,
    check_update_scale,
)
from structurednets.testing.setup_checks import (
    check_approximation_robustness,
    check_cuda,
    check_distributed_training,
    check_divergence_is_reported,
    check_follows_module_device,
    check_random_invalid_arguments,
    check_random_valid_arguments,
    check_state_dict_mismatch_is_refused,
    check_torch_compile,
)

__all__ = ["check_structure", "conformance_checks"]

_CHECKS = [
    check_registered,
    check_constructor_signature,
    check_output_shapes,
    check_forward_matches_dense,
    check_budget_and_parameter_counts,
    check_gradients,
    check_optimisers_reduce_loss,
    check_state_dict_round_trip,
    check_copy_and_serialisation,
    check_dtype_conversion,
    check_no_bias,
    check_initial_bias,
    check_initial_weight_matrix,
    check_random_init_scale,
    check_output_variance,
    check_update_scale,
    check_trains_from_scratch,
    check_bad_constructor_arguments,
    check_bad_inputs,
    check_repr,
    check_docstring_example,
    check_state_dict_mismatch_is_refused,
    check_layout_round_trip,
    check_layout_mismatch_is_refused,
    check_save_and_load,
    check_cost_is_reported,
    check_dtypes_and_autocast,
    check_reduced_precision_layers,
    check_follows_module_device,
    check_cuda,
    check_cuda_precision,
    check_torch_compile,
    check_autocast_compiles,
    check_distributed_training,
    check_approximation_robustness,
    check_divergence_is_reported,
    check_random_valid_arguments,
    check_random_invalid_arguments,
]


def conformance_checks() -> list[Check]:
    """Every check of the kit, in a fixed order; parametrize a test over them."""
    return [Check(function.__name__.removeprefix("check_"), function) for function in _CHECKS]


def check_structure(structure: str, **case_options: Any) -> list[str]:
    """Run every check on ``structure`` without pytest; raise ``AssertionError`` listing all
    failures. Returns the skipped checks with their reasons.

    ``case_options`` are :class:`ConformanceCase` fields (``options``, ``shape``, ...).
    """
    case = ConformanceCase(structure, **case_options)
    failures, skipped = [], []
    for check in conformance_checks():
        try:
            check.run(case)
        except CheckSkipped as reason:
            skipped.append(f"{check.name}: {reason}")
        except Exception as error:  # noqa: BLE001 - every failure is reported, not just the first
            failures.append(f"{check.name}: {type(error).__name__}: {error}")
    if failures:
        raise AssertionError(
            f"structure {structure!r} fails {len(failures)} conformance check(s):\n"
            + "\n".join(failures)
        )
    return skipped
