"""Sequentially semiseparable (SSS) layers for structurednets (structure ``"sss"``)."""

from structurednets_sss.identification import Identification, identify
from structurednets_sss.layer import SSSLayer
from structurednets_sss.plan import SSSPlan, default_nb_stages, sss_nb_weight_parameters
from structurednets_sss.system import SSSSystem

__version__ = "0.1.0"

__all__ = [
    "Identification",
    "SSSLayer",
    "SSSPlan",
    "SSSSystem",
    "__version__",
    "default_nb_stages",
    "identify",
    "sss_nb_weight_parameters",
]
