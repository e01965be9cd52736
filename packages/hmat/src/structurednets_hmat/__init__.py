"""Hierarchical-matrix (H-matrix) layers for structurednets (structure ``"hmat"``)."""

from structurednets_hmat.approximation import (
    HMatrix,
    LeafSpectrum,
    allocate_greedy,
    allocate_uniform,
    approximate,
    relative_error,
    smallest_nb_parameters,
)
from structurednets_hmat.layer import HMatLayer, hmat_nb_weight_parameters, plan_partition
from structurednets_hmat.partition import HMatrixPartition, Leaf

__version__ = "0.1.0"

__all__ = [
    "HMatLayer",
    "HMatrix",
    "HMatrixPartition",
    "Leaf",
    "LeafSpectrum",
    "__version__",
    "allocate_greedy",
    "allocate_uniform",
    "approximate",
    "hmat_nb_weight_parameters",
    "plan_partition",
    "relative_error",
    "smallest_nb_parameters",
]
