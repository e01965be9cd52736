"""Entry point of the SSS plugin (group ``structurednets``)."""

from structurednets.plugin import hookimpl
from structurednets_sss.layer import SSSLayer
from structurednets_sss.options import sss_nb_weight_parameters


@hookimpl
def structurednets_register_structures(register):
    register("sss", SSSLayer, sss_nb_weight_parameters)
