"""Save a model holding structured layers, and load it into its uncompressed architecture.

The file is a `safetensors <https://github.com/huggingface/safetensors>`_ file: the model's
tensors, plus one JSON metadata entry with every structured layer's :class:`Layout`. Loading
it runs no code (unlike a pickle), so a checkpoint from anywhere is safe to open, and it needs
no fit: :func:`load` replaces each module that was compressed by an unfitted layer of the
saved layout and loads the tensors into it.

>>> import structurednets
>>> small, report = structurednets.compress(model, "lowrank", 0.25)  # doctest: +SKIP
>>> structurednets.save(small, "small.safetensors")  # doctest: +SKIP
>>> restored = structurednets.load("small.safetensors", MyModel())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from structurednets.layers.structured_layer import StructuredLayer
from structurednets.layout import Layout
from structurednets.registry import create

__all__ = ["CheckpointError", "load", "save"]

METADATA_KEY = "structurednets"
FORMAT = 1
_EXTRA_STATE = "_extra_state"
_INT_WIDTHS = (torch.int8, torch.int16, torch.int32, torch.int64)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the model it is loaded into."""


# -- saving ------------------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` (its tensors and its structured layers' layouts) to ``path``.

    Integer buffers (supports, permutations) are stored in the smallest integer type that
    holds their values; tensors that share memory (tied weights) are stored once. The file
    is written beside ``path`` and renamed into place, so a failed or interrupted save
    leaves an existing file as it was. Returns the path written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path must be a file name, got the folder {str(path)!r}")
    tensors, header = _flatten(model)
    metadata = {METADATA_KEY: json.dumps(header, sort_keys=True)}
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    os.close(descriptor)
    try:
        save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _flatten(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to write (deduplicated, contiguous, narrow integers) and the JSON header."""
    layouts = {
        name: module.layout.to_json()
        for name, module in model.named_modules()
        if isinstance(module, StructuredLayer)
    }
    tensors: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    dtypes: dict[str, str] = {}
    extra_states: dict[str, Any] = {}
    seen: dict[tuple[object, ...], str] = {}
    for key, value in model.state_dict().items():
        if key.endswith(_EXTRA_STATE):
            owner = key[: -len(_EXTRA_STATE)].rstrip(".")
            if owner in layouts:
                continue  # rebuilt from the layout
            extra_states[key] = _json_extra_state(key, value)
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        identity = (
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            value.stride(),
            value.dtype,
        )
        if value.numel() and identity in seen:
            shared[key] = seen[identity]
            continue
        seen[identity] = key
        stored = value.detach().to("cpu").contiguous().clone()
        narrow = _narrowest_int(stored)
        if narrow is not None and narrow != stored.dtype:
            dtypes[key] = str(stored.dtype).removeprefix("torch.")
            stored = stored.to(narrow)
        tensors[key] = stored
    header = {
        "format": FORMAT,
        "layouts": layouts,
        "shared": shared,
        "dtypes": dtypes,
        "extra_states": extra_states,
    }
    return tensors, header


def _narrowest_int(tensor: torch.Tensor) -> torch.dtype | None:
    if tensor.dtype not in _INT_WIDTHS:
        return None
    if tensor.numel() == 0:
        return torch.int8
    low, high = int(tensor.min()), int(tensor.max())
    for dtype in _INT_WIDTHS:
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return tensor.dtype


def _json_extra_state(key: str, value: object) -> object:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"state dict entry {key!r} (a module's extra state) is not JSON-serialisable, so it "
            "cannot be saved without pickle"
        ) from None
    return value


# -- loading -----------------------------------------------------------------------------------


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    map_location: str | torch.device | None = None,
) -> nn.Module:
    """Load a file written by :func:`save` into ``model``, the uncompressed architecture.

    Each module that was a structured layer when saved (an ``nn.Linear``, a GPT-2-style
    ``Conv1D`` or a structured layer of the same sizes in ``model``) is replaced by an
    unfitted layer of the saved layout; then every tensor is loaded. Nothing is fitted, and
    the outputs are those of the saved model. The file is read and checked completely before
    ``model`` is changed: a file that is truncated, corrupted, or saved from another
    architecture raises :class:`CheckpointError` naming the file (and the module), and leaves
    ``model`` as it was. Returns the model (the new layer itself if ``model`` was a structured
    layer saved on its own).

    Args:
        path: the file.
        model: the architecture, e.g. the original model class freshly instantiated.
        map_location: device for the new structured layers; by default that of the module
            each replaces.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    tensors, header = _read(path)
    layouts = _layouts(path, header)
    replacements = {
        name: _replacement(path, model, name, layout, tensors, map_location)
        for name, layout in layouts.items()
    }
    state = dict(tensors)
    for alias, canonical in header["shared"].items():
        if canonical not in tensors:
            raise CheckpointError(f"{path}: shared entry {alias!r} names a missing {canonical!r}")
        state[alias] = tensors[canonical]
    for key, dtype in header["dtypes"].items():
        if key in state:
            state[key] = state[key].to(getattr(torch, dtype))
    state.update(header["extra_states"])
    if "" in replacements:
        layer = replacements[""]
        _load_into(path, layer, state, "")
        return layer
    expected = _expected_entries(model, replacements)
    _check_entries(path, expected, state)
    for name, layer in replacements.items():
        prefix = f"{name}."
        _load_into(
            path,
            layer,
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
            name,
        )
    for name, layer in replacements.items():
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, layer)
    rest = {
        key: value
        for key, value in state.items()
        if not any(key.startswith(f"{name}.") for name in replacements)
    }
    model.load_state_dict(rest, strict=False)
    return model


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{path} cannot be read as a safetensors checkpoint (truncated or corrupted?): {error}"
        ) from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path} was not written by structurednets.save (its metadata has no "
            f"{METADATA_KEY!r} entry)"
        )
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its structurednets metadata is not JSON: {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {header.get('format') if isinstance(header, dict) else header!r} "
            f"is not supported (this structurednets reads format {FORMAT})"
        )
    for key in ("layouts", "shared", "dtypes", "extra_states"):
        if not isinstance(header.get(key), dict):
            raise CheckpointError(f"{path}: its structurednets metadata lacks {key!r}")
    return tensors, header


def _layouts(path: Path, header: Mapping[str, Any]) -> dict[str, Layout]:
    layouts = {}
    for name, data in header["layouts"].items():
        try:
            layouts[name] = Layout.from_json(data)
        except (TypeError, ValueError) as error:
            raise CheckpointError(
                f"{path}: the layout of module {name!r} is invalid: {error}"
            ) from None
    return layouts


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(input_dim, output_dim)`` of a module a structured layer may stand in for."""
    if isinstance(module, StructuredLayer):
        return module.input_dim, module.output_dim
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])  # GPT-2's Conv1D: weight is (in, out)
    return None


def _replacement(
    path: Path,
    model: nn.Module,
    name: str,
    layout: Layout,
    tensors: Mapping[str, torch.Tensor],
    map_location: str | torch.device | None,
) -> StructuredLayer:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(
            f"{path} holds a structured layer at module {name!r}, which this "
            f"{type(model).__name__} does not have; was it saved from another architecture?"
        ) from None
    dims = _linear_dims(module)
    if dims != (layout.input_dim, layout.output_dim):
        raise CheckpointError(
            f"{path} holds a {layout.output_dim} x {layout.input_dim} (output x input) "
            f"'{layout.structure}' layer at module {name!r}, but this model's {name!r} is "
            + (
                f"a {type(module).__name__} of {dims[1]} x {dims[0]}"
                if dims
                else f"a {type(module).__name__}, not a linear layer"
            )
        )
    try:
        layer = create(layout.structure, layout=layout)
    except (TypeError, ValueError) as error:  # an unknown structure, an invalid layout
        raise CheckpointError(f"{path}: cannot build module {name!r}: {error}") from None
    prefix = f"{name}." if name else ""
    saved = [t for k, t in tensors.items() if k.startswith(prefix) and t.is_floating_point()]
    reference = next((t for t in module.parameters()), None)
    device = map_location or (reference.device if reference is not None else None)
    dtype = saved[0].dtype if saved else None
    return layer.to(device=device, dtype=dtype)


def _expected_entries(
    model: nn.Module, replacements: Mapping[str, StructuredLayer]
) -> dict[str, torch.Size | None]:
    expected: dict[str, torch.Size | None] = {}
    for key, value in model.state_dict().items():
        if any(key.startswith(f"{name}.") for name in replacements):
            continue
        expected[key] = value.shape if isinstance(value, torch.Tensor) else None
    for name, layer in replacements.items():
        for key, value in layer.state_dict().items():
            if not key.endswith(_EXTRA_STATE):
                expected[f"{name}.{key}"] = value.shape
    return expected


def _check_entries(
    path: Path, expected: Mapping[str, torch.Size | None], state: Mapping[str, object]
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model (saved from another architecture?): "
            + "; ".join(
                part
                for part in (
                    f"missing {_few(missing)}" if missing else "",
                    f"not in the model {_few(unexpected)}" if unexpected else "",
                )
                if part
            )
        )
    for key, shape in expected.items():
        value = state[key]
        if shape is not None and isinstance(value, torch.Tensor) and value.shape != shape:
            raise CheckpointError(
                f"{path}: entry {key!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(shape)} in the model"
            )


def _load_into(path: Path, layer: StructuredLayer, state: Mapping[str, object], name: str) -> None:
    state = {**state, _EXTRA_STATE: layer.get_extra_state()}
    try:
        layer.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: module {name!r} does not load: {error}") from None


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(key) for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
