"""Entry point of the LDR plugin (group ``structurednets``)."""

from structurednets import hookimpl
from structurednets_ldr.layer import LDRLayer, ldr_nb_weight_parameters


@hookimpl
def structurednets_register_structures(register):
    register("ldr", LDRLayer, ldr_nb_weight_parameters)
