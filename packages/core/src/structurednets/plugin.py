"""Everything a structure plugin's author needs, in one place (the user API is the package).

A plugin subclasses :class:`StructuredLayer` (implementing ``multiply`` and
``layout_sizes``), registers it from a module named by an entry point in the group
``structurednets`` with :data:`hookimpl`, validates its arguments with the helpers below (so
that every structure's messages read alike), and runs :mod:`structurednets.testing` in its
tests. Under autocast, core's policy (:mod:`structurednets.precision`) runs ``multiply`` in
the autocast dtype; a structure that needs more precision in a step lists the tensors to keep
in ``autocast_full_precision``, and one that falls back to a slow path on some device says so
once with :func:`warn_slow_fallback`. See the root README's "Writing a structure".
"""

from structurednets.cost import Cost, dense_cost
from structurednets.hookspecs import hookimpl
from structurednets.layers.layer_helpers import default_dtype, get_nb_model_parameters
from structurednets.layers.structured_layer import StructuredLayer, dense_init_std
from structurednets.layout import Layout
from structurednets.numerics import (
    balanced_factors,
    balanced_truncated_svd,
    largest_count_within,
    relative_error,
    torch_threads,
)
from structurednets.precision import (
    REDUCED_DTYPES,
    SlowFallbackWarning,
    accumulation_dtype,
    autocast_off,
    warn_slow_fallback,
)
from structurednets.validation import (
    BudgetTooSmallError,
    as_matrix,
    as_vector,
    check_dim,
    check_positive_int,
    check_share,
    smallest_share,
    weight_budget,
)

__all__ = [
    "REDUCED_DTYPES",
    "BudgetTooSmallError",
    "Cost",
    "Layout",
    "SlowFallbackWarning",
    "StructuredLayer",
    "accumulation_dtype",
    "as_matrix",
    "as_vector",
    "autocast_off",
    "balanced_factors",
    "balanced_truncated_svd",
    "check_dim",
    "check_positive_int",
    "check_share",
    "default_dtype",
    "dense_cost",
    "dense_init_std",
    "get_nb_model_parameters",
    "hookimpl",
    "largest_count_within",
    "relative_error",
    "smallest_share",
    "torch_threads",
    "warn_slow_fallback",
    "weight_budget",
]
