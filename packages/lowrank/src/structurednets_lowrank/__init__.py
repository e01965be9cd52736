"""Low-rank structured layers for structurednets (structure ``"lowrank"``, alias ``"lr"``)."""

from structurednets_lowrank.layer import (
    LRLayer,
    lowrank_nb_weight_parameters,
    plan_rank,
    truncated_svd_factors,
)

__version__ = "0.1.0"

__all__ = [
    "LRLayer",
    "__version__",
    "lowrank_nb_weight_parameters",
    "plan_rank",
    "truncated_svd_factors",
]
