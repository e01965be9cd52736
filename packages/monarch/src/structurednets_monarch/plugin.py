"""Entry point of the Monarch plugin (group ``structurednets``)."""

from structurednets.plugin import hookimpl
from structurednets_monarch.layer import MonarchLayer
from structurednets_monarch.layout import monarch_nb_weight_parameters


@hookimpl
def structurednets_register_structures(register):
    register("monarch", MonarchLayer, monarch_nb_weight_parameters)
