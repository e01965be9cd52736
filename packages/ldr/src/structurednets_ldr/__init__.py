"""Low displacement rank layers for structurednets (structure ``"ldr"``).

Modules: :mod:`~structurednets_ldr.layer` (:class:`LDRLayer`), :mod:`~structurednets_ldr.layout`
(its sizes and parameter count), :mod:`~structurednets_ldr.fit` (:func:`fit_ldr`),
:mod:`~structurednets_ldr.kernels` (the products :func:`weight` and :func:`multiply` and their
backward), :mod:`~structurednets_ldr.schedule` (the cost model that picks how a product is
evaluated), :mod:`~structurednets_ldr.operators` (the three-band operators),
:mod:`~structurednets_ldr.plugin` (registration).
"""

from structurednets_ldr.fit import LDRFit, fit_ldr
from structurednets_ldr.kernels import multiply, release_scratch, weight
from structurednets_ldr.layer import LDRLayer
from structurednets_ldr.layout import displacement_rank_for, ldr_nb_weight_parameters
from structurednets_ldr.operators import bands_from_dense, bands_to_dense, cyclic_shift_bands

__version__ = "0.1.0"

__all__ = [
    "LDRFit",
    "LDRLayer",
    "__version__",
    "bands_from_dense",
    "bands_to_dense",
    "cyclic_shift_bands",
    "displacement_rank_for",
    "fit_ldr",
    "ldr_nb_weight_parameters",
    "multiply",
    "release_scratch",
    "weight",
]
