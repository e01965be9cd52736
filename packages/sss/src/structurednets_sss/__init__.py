"""Sequentially semiseparable (SSS) layers for structurednets (structure ``"sss"``)."""

from structurednets_sss.fit import SSSFit, fit_sss
from structurednets_sss.layer import SSSLayer
from structurednets_sss.layout import SSSSizes, default_nb_stages
from structurednets_sss.options import sss_nb_weight_parameters
from structurednets_sss.system import SSSSystem

__version__ = "0.1.0"

__all__ = [
    "SSSFit",
    "SSSLayer",
    "SSSSizes",
    "SSSSystem",
    "__version__",
    "default_nb_stages",
    "fit_sss",
    "sss_nb_weight_parameters",
]
