"""Entry point of the LDR plugin (group ``structurednets``)."""

from structurednets.plugin import hookimpl
from structurednets_ldr.layer import LDRLayer
from structurednets_ldr.layout import ldr_nb_weight_parameters


@hookimpl
def structurednets_register_structures(register):
    register("ldr", LDRLayer, ldr_nb_weight_parameters)
