"""Low displacement rank layers for structurednets (structure ``"ldr"``)."""

__version__ = "0.1.0"
