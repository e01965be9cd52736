"""Products of sparse matrices for structurednets (structure ``"psm"``).

``W = S_1 S_2 ... S_J`` with sparse factors of fixed support; fitted to a dense matrix by
hierarchical PALM (Le Magoarou and Gribonval, 2016).
"""

from structurednets_psm.factors import BlockSparseFactor, SparseFactor, random_support
from structurednets_psm.layer import PSMLayer, psm_nb_weight_parameters
from structurednets_psm.palm import (
    Factorization,
    PALMSettings,
    Strategy,
    factorize,
    hierarchical_factorization,
)
from structurednets_psm.plan import PSMPlan, factor_shapes, plan_psm, split_nonzeros

__version__ = "0.1.0"

__all__ = [
    "BlockSparseFactor",
    "Factorization",
    "PALMSettings",
    "PSMLayer",
    "PSMPlan",
    "SparseFactor",
    "Strategy",
    "__version__",
    "factor_shapes",
    "factorize",
    "hierarchical_factorization",
    "plan_psm",
    "psm_nb_weight_parameters",
    "random_support",
    "split_nonzeros",
]
