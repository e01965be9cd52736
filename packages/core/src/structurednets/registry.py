"""The structure registry: plugins found through entry points, plus in-process registrations.

Entry points in the group ``structurednets`` are loaded lazily, once, the first time a
structure is looked up. :func:`register` adds a structure directly (tests, notebooks,
third-party code that is not packaged).
"""

from __future__ import annotations

import importlib.metadata
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from structurednets import hookspecs
from structurednets.layers.structured_layer import StructuredLayer
from structurednets.layout import Layout, thaw
from structurednets.validation import check_dim, check_share

__all__ = [
    "ENTRY_POINT_GROUP",
    "Structure",
    "UnknownStructureError",
    "available",
    "create",
    "get_structure",
    "load_plugins",
    "nb_parameters",
    "register",
    "unregister",
]

ENTRY_POINT_GROUP = "structurednets"
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Structure:
    """A registered structure.

    Attributes:
        name: the name ``create`` takes, e.g. ``"lowrank"``.
        layer_class: the :class:`StructuredLayer` subclass that implements it.
        nb_weight_parameters: ``f(input_dim, output_dim, nb_params_share, **options) -> int``,
            the number of weight scalars (bias excluded) a layer built with these arguments
            holds, computed without building it.
        aliases: other names that resolve to this structure, e.g. ``("lr",)``.
    """

    name: str
    layer_class: type[StructuredLayer]
    nb_weight_parameters: Callable[..., int]
    aliases: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        """First paragraph of the layer class's docstring on one line, without RST markup."""
        doc = (self.layer_class.__doc__ or "").strip()
        paragraph = " ".join(doc.split("\n\n")[0].split())
        return paragraph.replace("``", "")

    def __str__(self) -> str:
        aliases = f" (alias: {', '.join(self.aliases)})" if self.aliases else ""
        return f"{self.name}{aliases}"


class UnknownStructureError(ValueError):
    """The requested structure is neither registered nor provided by an installed plugin."""


_lock = threading.RLock()
_structures: dict[str, Structure] = {}
_aliases: dict[str, str] = {}
_plugins_loaded = False
_plugin_manager: pluggy.PluginManager | None = None


def register(
    name: str,
    layer_class: type[StructuredLayer],
    nb_weight_parameters: Callable[..., int],
    *,
    aliases: tuple[str, ...] | list[str] = (),
    replace: bool = False,
) -> Structure:
    """Register a structure under ``name`` (and ``aliases``) and return its description.

    Args:
        name: lower-case identifier, e.g. ``"hmat"``.
        layer_class: a :class:`StructuredLayer` subclass with the standard constructor.
        nb_weight_parameters: ``f(input_dim, output_dim, nb_params_share, **options) -> int``,
            the exact number of weight scalars (bias excluded) the layer will hold.
        aliases: other names for the structure.
        replace: replace a structure already registered under one of these names instead
            of raising ``ValueError``.

    >>> import structurednets
    >>> structurednets.register("mine", MyLayer, nb_weight_parameters=my_count)  # doctest: +SKIP
    """
    names = (name, *aliases)
    for each in names:
        if not isinstance(each, str) or not _NAME_PATTERN.match(each):
            raise ValueError(
                f"structure names must be lower-case identifiers like 'hmat', got {each!r}"
            )
    if not (isinstance(layer_class, type) and issubclass(layer_class, StructuredLayer)):
        raise TypeError(
            f"layer_class must be a subclass of structurednets.StructuredLayer, got {layer_class!r}"
        )
    if not callable(nb_weight_parameters):
        raise TypeError(
            "nb_weight_parameters must be a function (input_dim, output_dim, nb_params_share, "
            f"**options) -> int, got {nb_weight_parameters!r}"
        )
    structure = Structure(name, layer_class, nb_weight_parameters, tuple(aliases))
    with _lock:
        taken = [each for each in names if each in _structures or each in _aliases]
        if taken and not replace:
            owners = sorted({_aliases.get(each, each) for each in taken})
            raise ValueError(
                f"structure name(s) {taken} already registered (by {owners}); "
                "pass replace=True to replace, or pick another name"
            )
        for each in taken:
            unregister(_aliases.get(each, each))
        _structures[name] = structure
        for alias in structure.aliases:
            _aliases[alias] = name
    return structure


def unregister(name: str) -> None:
    """Remove a structure (given by name or alias) and its aliases; unknown names raise."""
    with _lock:
        canonical = _aliases.get(name, name)
        if canonical not in _structures:
            raise UnknownStructureError(_unknown_message(name))
        structure = _structures.pop(canonical)
        for alias in structure.aliases:
            _aliases.pop(alias, None)


def _register_from_plugin(plugin_name: str) -> Callable[..., Structure | None]:
    def register_from_plugin(*args: Any, **kwargs: Any) -> Structure | None:
        try:
            return register(*args, **kwargs)
        except (TypeError, ValueError) as error:
            warnings.warn(
                f"structurednets plugin {plugin_name!r} could not register a structure: {error}",
                stacklevel=2,
            )
            return None

    return register_from_plugin


def plugin_manager() -> pluggy.PluginManager:
    """The pluggy plugin manager holding the loaded plugin modules."""
    global _plugin_manager
    with _lock:
        if _plugin_manager is None:
            _plugin_manager = pluggy.PluginManager("structurednets")
            _plugin_manager.add_hookspecs(hookspecs)
        return _plugin_manager


def load_plugins() -> None:
    """Load every entry point in the group ``structurednets`` and let it register; once only.

    A plugin that fails to import is skipped with a warning that names it, so that one
    broken package does not make the others unusable.
    """
    global _plugins_loaded
    with _lock:
        if _plugins_loaded:
            return
        _plugins_loaded = True
        manager = plugin_manager()
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if manager.get_plugin(entry_point.name) is not None:
                continue
            try:
                module = entry_point.load()
            except Exception as error:  # noqa: BLE001 - any import failure: report and go on
                warnings.warn(
                    f"structurednets plugin {entry_point.name!r} ({entry_point.value}) failed "
                    f"to load and is skipped: {type(error).__name__}: {error}",
                    stacklevel=2,
                )
                continue
            manager.register(module, name=entry_point.name)
            hook = manager.subset_hook_caller(
                "structurednets_register_structures",
                remove_plugins=[p for p in manager.get_plugins() if p is not module],
            )
            try:
                hook(register=_register_from_plugin(entry_point.name))
            except Exception as error:  # noqa: BLE001 - a broken plugin must not break the rest
                warnings.warn(
                    f"structurednets plugin {entry_point.name!r} failed while registering its "
                    f"structures and is skipped: {type(error).__name__}: {error}",
                    stacklevel=2,
                )


def _unknown_message(name: object) -> str:
    installed = ", ".join(str(s) for s in sorted(_structures.values(), key=lambda s: s.name))
    installed = installed or "none"
    return (
        f"unknown structure {name!r}. Installed structures: {installed}. "
        f"If {name!r} is provided by a plugin, install it: pip install structurednets-{name}"
    )


def get_structure(name: str) -> Structure:
    """The registered structure called ``name`` (or with that alias)."""
    if not isinstance(name, str):
        raise TypeError(f"structure name must be a string, got {name!r}")
    load_plugins()
    with _lock:
        canonical = _aliases.get(name, name)
        if canonical not in _structures:
            raise UnknownStructureError(_unknown_message(name))
        return _structures[canonical]


def available() -> list[str]:
    """Names of the installed structures, sorted (aliases not included)."""
    load_plugins()
    with _lock:
        return sorted(_structures)


def create(
    name: str,
    input_dim: int | None = None,
    output_dim: int | None = None,
    nb_params_share: float | None = None,
    *,
    layout: Layout | None = None,
    **kwargs: Any,
) -> StructuredLayer:
    """Build a layer of the structure ``name``.

    ``kwargs`` are passed to the layer class: ``use_bias``, ``initial_weight_matrix``,
    ``initial_bias`` and the structure's own options. With ``layout=`` (a
    :class:`~structurednets.Layout`, e.g. ``fitted.layout``) the layer is an unfitted one of
    exactly that layout, ready for ``load_state_dict``; the sizes may then be left out.

    >>> import structurednets
    >>> layer = structurednets.create("lowrank", 512, 256, 0.1)
    >>> layer(torch.randn(8, 512)).shape  # doctest: +SKIP
    torch.Size([8, 256])
    >>> twin = structurednets.create("lowrank", layout=layer.layout)  # doctest: +SKIP
    """
    structure = get_structure(name)
    if layout is None:  # the layer class checks the sizes and says what is wrong
        return structure.layer_class(input_dim, output_dim, nb_params_share, **kwargs)
    layout = _checked_layout(structure, layout, input_dim, output_dim, nb_params_share)
    if kwargs:
        raise TypeError(
            f"create(..., layout=...) takes no other options, got {sorted(kwargs)}; "
            "the layout fixes the whole shape"
        )
    return structure.layer_class.from_layout(layout)


def _checked_layout(
    structure: Structure,
    layout: object,
    input_dim: int | None,
    output_dim: int | None,
    nb_params_share: float | None,
) -> Layout:
    if isinstance(layout, Mapping):
        layout = Layout.from_json(layout)
    if not isinstance(layout, Layout):
        raise TypeError(
            f"layout must be a structurednets.Layout (e.g. layer.layout), got "
            f"{type(layout).__name__}"
        )
    if layout.structure not in (structure.name, *structure.aliases):
        raise ValueError(
            f"layout is of structure {layout.structure!r}, but structure {structure.name!r} "
            f"was asked for; use structurednets.create({layout.structure!r}, layout=...)"
        )
    for arg, given, fixed in (
        ("input_dim", input_dim, layout.input_dim),
        ("output_dim", output_dim, layout.output_dim),
        ("nb_params_share", nb_params_share, layout.nb_params_share),
    ):
        if given is not None and given != fixed:
            raise ValueError(f"{arg}={given!r} disagrees with the layout's {arg} {fixed!r}")
    return layout


def nb_parameters(
    name: str,
    input_dim: int | None = None,
    output_dim: int | None = None,
    nb_params_share: float | None = None,
    use_bias: bool = True,
    *,
    layout: Layout | None = None,
    **options: Any,
) -> int:
    """The number of trainable scalars ``create`` would give (bias included), without building.

    With sizes and options, the count is that of a layer built without
    ``initial_weight_matrix`` (random start); with ``layout=`` (e.g. ``fitted.layout``) it is
    exact for that layout, fitted or not.
    """
    structure = get_structure(name)
    if layout is not None:
        layout = _checked_layout(structure, layout, input_dim, output_dim, nb_params_share)
        if options:
            raise TypeError(
                f"nb_parameters(..., layout=...) takes no options, got {sorted(options)}"
            )
        weights = structure.nb_weight_parameters(
            layout.input_dim, layout.output_dim, layout.nb_params_share, **thaw(layout.sizes)
        )
        return int(weights) + (layout.output_dim if layout.bias else 0)
    input_dim = check_dim("input_dim", input_dim)
    output_dim = check_dim("output_dim", output_dim)
    nb_params_share = check_share(nb_params_share)
    if not isinstance(use_bias, bool):
        raise TypeError(f"use_bias must be True or False, got {use_bias!r}")
    weights = structure.nb_weight_parameters(input_dim, output_dim, nb_params_share, **options)
    return int(weights) + (output_dim if use_bias else 0)
