"""Low-rank structured layers for structurednets (structure ``"lowrank"``, alias ``"lr"``)."""

from structurednets_lowrank.fit import fit_lowrank
from structurednets_lowrank.layer import LRLayer
from structurednets_lowrank.layout import layer_rank, lowrank_cost, lowrank_nb_weight_parameters

__version__ = "0.1.0"

__all__ = [
    "LRLayer",
    "__version__",
    "fit_lowrank",
    "layer_rank",
    "lowrank_cost",
    "lowrank_nb_weight_parameters",
]
