"""Entry point of the PSM plugin (group ``structurednets``)."""

from structurednets.plugin import hookimpl
from structurednets_psm.layer import PSMLayer, psm_nb_weight_parameters


@hookimpl
def structurednets_register_structures(register):
    register("psm", PSMLayer, psm_nb_weight_parameters)
