"""Products of sparse matrices for structurednets (structure ``"psm"``).

``W = S_1 S_2 ... S_J`` with sparse factors of fixed support; fitted to a dense matrix by
hierarchical PALM (Le Magoarou and Gribonval, 2016) with :func:`fit_psm`.
"""

from structurednets_psm.factors import BlockSparseFactor, SparseFactor, random_support
from structurednets_psm.fit import (
    Factorization,
    PALMSettings,
    Strategy,
    fit_psm,
    hierarchical_factorization,
)
from structurednets_psm.layer import PSMLayer, psm_nb_weight_parameters
from structurednets_psm.layout import FactorSizes, factor_shapes, layer_sizes, split_nonzeros

__version__ = "0.1.0"

__all__ = [
    "BlockSparseFactor",
    "FactorSizes",
    "Factorization",
    "PALMSettings",
    "PSMLayer",
    "SparseFactor",
    "Strategy",
    "__version__",
    "factor_shapes",
    "fit_psm",
    "hierarchical_factorization",
    "layer_sizes",
    "psm_nb_weight_parameters",
    "random_support",
    "split_nonzeros",
]
