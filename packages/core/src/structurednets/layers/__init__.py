"""The layer contract every structure implements, and helpers for any module."""

from structurednets.layers.layer_helpers import get_nb_model_parameters
from structurednets.layers.structured_layer import StructuredLayer

__all__ = ["StructuredLayer", "get_nb_model_parameters"]
