"""A layer's layout: everything that fixes its shape, as a frozen JSON-serialisable value.

A fit decides more than the weights: the rank, the partition and leaf ranks, the stage sizes and
state dimensions, the factor supports' sizes. The layout records those decisions, so that
``structurednets.create(name, layout=layout)`` builds an unfitted layer with exactly the
parameters and buffers of the fitted one, into which its state dict loads.

>>> from structurednets import Layout
>>> layout = Layout("lowrank", 512, 256, bias=True, nb_params_share=0.1, sizes={"rank": 17})
>>> Layout.from_json(layout.to_json()) == layout
True
>>> layout.sizes["rank"]
17
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from structurednets.validation import check_dim, check_share

__all__ = ["FrozenDict", "Layout", "freeze", "thaw"]

LAYOUT_FORMAT = 1


class FrozenDict(Mapping[str, Any]):
    """A read-only, hashable mapping from strings to frozen JSON values."""

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[str, Any] = ()) -> None:
        self._items = dict(items)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(sorted(self._items.items())))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._items == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self):  # pickling and deepcopy
        return (FrozenDict, (self._items,))


def freeze(value: Any, where: str = "sizes") -> Any:
    """``value`` as a frozen JSON value: lists become tuples, dicts :class:`FrozenDict`.

    Raises ``TypeError`` naming the path (e.g. ``sizes['ranks'][3]``) of anything that is not a
    JSON value (str, int, float, bool, None, list/tuple, dict with string keys).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):  # also numpy integers through __index__ below
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return value
    if hasattr(value, "__index__") and not hasattr(value, "shape"):
        return int(value.__index__())
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy/torch scalars
        return freeze(value.item(), where)
    if isinstance(value, (list, tuple)):
        return tuple(freeze(each, f"{where}[{i}]") for i, each in enumerate(value))
    if isinstance(value, Mapping):
        items = {}
        for key, each in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} must have string keys, got key {key!r}")
            items[key] = freeze(each, f"{where}[{key!r}]")
        return FrozenDict(items)
    raise TypeError(
        f"{where} must hold only JSON values (str, int, float, bool, None, lists, dicts), "
        f"got {type(value).__name__}"
    )


def thaw(value: Any) -> Any:
    """The plain JSON form (lists and dicts) of a frozen value."""
    if isinstance(value, tuple):
        return [thaw(each) for each in value]
    if isinstance(value, Mapping):
        return {key: thaw(each) for key, each in value.items()}
    return value


@dataclass(frozen=True)
class Layout:
    """The shape of a structured layer, as data.

    Args:
        structure: the registered structure name, e.g. ``"sss"``.
        input_dim, output_dim: the layer's sizes.
        bias: whether the layer has a bias.
        nb_params_share: the share the layer was built with (sets its ``weight_budget``).
        sizes: the structure's own shape decisions, as JSON values (ints, lists, dicts). They
            are keyword options of the layer class's constructor that rebuild exactly this
            shape, and of the structure's registered ``nb_weight_parameters``.
    """

    structure: str
    input_dim: int
    output_dim: int
    bias: bool
    nb_params_share: float
    sizes: Mapping[str, Any] = field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        if not isinstance(self.structure, str) or not self.structure:
            raise TypeError(f"structure must be a non-empty string, got {self.structure!r}")
        object.__setattr__(self, "input_dim", check_dim("input_dim", self.input_dim))
        object.__setattr__(self, "output_dim", check_dim("output_dim", self.output_dim))
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias must be True or False, got {self.bias!r}")
        object.__setattr__(self, "nb_params_share", check_share(self.nb_params_share))
        if not isinstance(self.sizes, Mapping):
            raise TypeError(f"sizes must be a mapping, got {type(self.sizes).__name__}")
        object.__setattr__(self, "sizes", freeze(self.sizes))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON form (``json.dumps`` accepts it); :meth:`from_json` inverts it."""
        return {
            "format": LAYOUT_FORMAT,
            "structure": self.structure,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "bias": self.bias,
            "nb_params_share": self.nb_params_share,
            "sizes": thaw(self.sizes),
        }

    def dumps(self) -> str:
        """The layout as a JSON string."""
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, data: object) -> Layout:
        """The layout written by :meth:`to_json` (a dict, or its JSON string)."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as error:
                raise ValueError(f"layout is not valid JSON: {error}") from None
        if not isinstance(data, Mapping):
            raise TypeError(f"layout must be a dict, got {type(data).__name__}")
        expected = {"structure", "input_dim", "output_dim", "bias", "nb_params_share", "sizes"}
        missing = sorted(expected - set(data))
        if missing:
            raise ValueError(f"layout lacks the keys {missing}; got keys {sorted(data)}")
        version = data.get("format", LAYOUT_FORMAT)
        if version != LAYOUT_FORMAT:
            raise ValueError(
                f"layout format {version!r} is not supported (this structurednets reads "
                f"format {LAYOUT_FORMAT}); upgrade structurednets"
            )
        return cls(**{key: data[key] for key in expected})

    def differences(self, other: Layout) -> list[str]:
        """What differs between two layouts, one phrase each (empty when equal)."""
        found = []
        for name in ("structure", "input_dim", "output_dim", "bias", "nb_params_share"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                found.append(f"{name} {mine!r} vs {theirs!r}")
        for key in sorted(set(self.sizes) | set(other.sizes)):
            mine, theirs = self.sizes.get(key, "<absent>"), other.sizes.get(key, "<absent>")
            if mine != theirs:
                found.append(f"sizes[{key!r}] {_short(thaw(mine))} vs {_short(thaw(theirs))}")
        return found

    def __str__(self) -> str:
        sizes = ", ".join(f"{key}={_short(thaw(value))}" for key, value in self.sizes.items())
        return (
            f"{self.structure} {self.output_dim} x {self.input_dim} (output x input), "
            f"bias={self.bias}, share {self.nb_params_share:g}" + (f", {sizes}" if sizes else "")
        )


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
