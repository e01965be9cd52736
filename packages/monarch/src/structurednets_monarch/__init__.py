"""Monarch layers for structurednets (structure ``"monarch"``): ``W = L P R``."""

from structurednets_monarch.fit import MonarchFactors, MonarchFit, fit_monarch, monarch_project
from structurednets_monarch.kernels import monarch_dense, monarch_multiply
from structurednets_monarch.layer import MonarchLayer
from structurednets_monarch.layout import (
    MonarchShape,
    monarch_nb_weight_parameters,
    plan_monarch,
)

__version__ = "0.1.0"

__all__ = [
    "MonarchFactors",
    "MonarchFit",
    "MonarchLayer",
    "MonarchShape",
    "__version__",
    "fit_monarch",
    "monarch_dense",
    "monarch_multiply",
    "monarch_nb_weight_parameters",
    "monarch_project",
    "plan_monarch",
]
