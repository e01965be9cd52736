"""Everything a structure plugin's author needs, in one place (the user API is the package).

A plugin subclasses :class:`StructuredLayer` (implementing ``multiply`` and
``layout_sizes``), registers it from a module named by an entry point in the group
``structurednets`` with :data:`hookimpl`, validates its arguments with the helpers below (so
that every structure's messages read alike), and runs :mod:`structurednets.testing` in its
tests. See the root README's "Writing a structure".
"""

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
    "BudgetTooSmallError",
    "Layout",
    "StructuredLayer",
    "as_matrix",
    "as_vector",
    "balanced_factors",
    "balanced_truncated_svd",
    "check_dim",
    "check_positive_int",
    "check_share",
    "default_dtype",
    "dense_init_std",
    "get_nb_model_parameters",
    "hookimpl",
    "largest_count_within",
    "relative_error",
    "smallest_share",
    "torch_threads",
    "weight_budget",
]
