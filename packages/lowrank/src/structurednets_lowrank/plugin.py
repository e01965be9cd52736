"""Entry point of the low-rank plugin (group ``structurednets``)."""

from structurednets.plugin import hookimpl
from structurednets_lowrank.layer import LRLayer
from structurednets_lowrank.layout import lowrank_nb_weight_parameters


@hookimpl
def structurednets_register_structures(register):
    register("lowrank", LRLayer, lowrank_nb_weight_parameters, aliases=("lr",))
