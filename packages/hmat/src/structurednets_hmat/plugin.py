"""Entry point of the H-matrix plugin (group ``structurednets``)."""

from structurednets.plugin import hookimpl
from structurednets_hmat.layer import HMatLayer
from structurednets_hmat.layout import hmat_nb_weight_parameters


@hookimpl
def structurednets_register_structures(register):
    register("hmat", HMatLayer, hmat_nb_weight_parameters)
