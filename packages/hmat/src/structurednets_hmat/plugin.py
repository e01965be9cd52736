"""Entry point of the H-matrix plugin (group ``structurednets``)."""

from structurednets import hookimpl
from structurednets_hmat.layer import HMatLayer, hmat_nb_weight_parameters


@hookimpl
def structurednets_register_structures(register):
    register("hmat", HMatLayer, hmat_nb_weight_parameters)
