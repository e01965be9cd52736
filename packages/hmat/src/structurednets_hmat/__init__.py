"""Hierarchical-matrix (H-matrix) layers for structurednets (structure ``"hmat"``)."""

from structurednets_hmat.allocation import (
    LeafSpectrum,
    allocate_greedy,
    allocate_uniform,
    smallest_nb_parameters,
)
from structurednets_hmat.fit import fit_hmat
from structurednets_hmat.hmatrix import HMatrix
from structurednets_hmat.layer import HMatLayer
from structurednets_hmat.layout import (
    hmat_nb_weight_parameters,
    layer_partition,
    partition_from_json,
    partition_to_json,
)
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
    "fit_hmat",
    "hmat_nb_weight_parameters",
    "layer_partition",
    "partition_from_json",
    "partition_to_json",
    "smallest_nb_parameters",
]
