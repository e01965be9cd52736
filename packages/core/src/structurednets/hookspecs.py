"""The hooks a structurednets plugin implements.

A plugin is a module named by an entry point in the group ``structurednets``::

    [project.entry-points.structurednets]
    mystructure = "my_package.plugin"

and that module implements :func:`structurednets_register_structures`::

    from structurednets import hookimpl

    @hookimpl
    def structurednets_register_structures(register):
        register("mystructure", MyLayer, nb_weight_parameters=my_count)
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

__all__ = ["hookimpl", "hookspec", "structurednets_register_structures"]

hookspec = pluggy.HookspecMarker("structurednets")
hookimpl = pluggy.HookimplMarker("structurednets")


@hookspec
def structurednets_register_structures(register: Callable[..., object]) -> None:
    """Register the structures this plugin provides.

    Args:
        register: :func:`structurednets.register`; call it once per structure.
    """
