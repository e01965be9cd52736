"""structurednets: PyTorch layers whose weight matrix is structured.

>>> import structurednets
>>> structurednets.available()  # doctest: +SKIP
['lowrank']
>>> layer = structurednets.create("lowrank", 784, 256, nb_params_share=0.1)  # doctest: +SKIP
>>> fit = structurednets.approximate(weight, "best", 0.1)  # doctest: +SKIP
>>> small_model, report = structurednets.compress(model, "lowrank", 0.1)  # doctest: +SKIP
"""

from structurednets.approximation import (
    Approximation,
    NoStructureFitsError,
    SkippedStructure,
    approximate,
)
from structurednets.checkpoint import CheckpointError, load, save
from structurednets.compression import CompressionReport, CompressionResult, compress
from structurednets.cost import Cost
from structurednets.hookspecs import hookimpl, hookspec
from structurednets.layers import StructuredLayer, get_nb_model_parameters
from structurednets.layout import Layout
from structurednets.registry import (
    Structure,
    UnknownStructureError,
    available,
    create,
    get_structure,
    load_plugins,
    nb_parameters,
    register,
    unregister,
)
from structurednets.training_helpers import param_groups
from structurednets.validation import BudgetTooSmallError

__version__ = "0.1.0"

__all__ = [
    "Approximation",
    "BudgetTooSmallError",
    "CheckpointError",
    "CompressionReport",
    "CompressionResult",
    "Cost",
    "Layout",
    "NoStructureFitsError",
    "SkippedStructure",
    "Structure",
    "StructuredLayer",
    "UnknownStructureError",
    "__version__",
    "approximate",
    "available",
    "compress",
    "create",
    "get_nb_model_parameters",
    "get_structure",
    "hookimpl",
    "hookspec",
    "load",
    "load_plugins",
    "nb_parameters",
    "param_groups",
    "register",
    "save",
    "unregister",
]
