"""Low displacement rank layers for structurednets (structure ``"ldr"``)."""

from structurednets_ldr.approximation import LDRFit, fit_ldr
from structurednets_ldr.layer import LDRLayer, ldr_nb_weight_parameters, plan_displacement_rank
from structurednets_ldr.operators import bands_from_dense, bands_to_dense, cyclic_shift_bands
from structurednets_ldr.ops import ldr_multiply, ldr_weight
from structurednets_ldr.scratch import release_scratch

__version__ = "0.1.0"

__all__ = [
    "LDRFit",
    "LDRLayer",
    "__version__",
    "bands_from_dense",
    "bands_to_dense",
    "cyclic_shift_bands",
    "fit_ldr",
    "ldr_multiply",
    "ldr_nb_weight_parameters",
    "ldr_weight",
    "plan_displacement_rank",
    "release_scratch",
]
