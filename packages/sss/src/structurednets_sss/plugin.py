"""Entry point of the SSS plugin (group ``structurednets``)."""

from structurednets import hookimpl
from structurednets_sss.layer import SSSLayer
from structurednets_sss.plan import sss_nb_weight_parameters


@hookimpl
def structurednets_register_structures(register):
    register("sss", SSSLayer, sss_nb_weight_parameters)
