"""Reading the matrix a command works on from a ``.npy``, ``.npz`` or ``.pt`` file."""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch

from structurednets.approximation import as_weight_matrix

__all__ = ["CommandError", "load_matrix"]


class CommandError(Exception):
    """An error to report as one line on stderr, with exit code 2."""


def load_matrix(path: str, key: str | None = None) -> torch.Tensor:
    """The matrix stored in a ``.npy``, ``.npz`` or ``.pt``/``.pth`` file, as a float64 tensor.

    A ``.npz`` file or a ``.pt`` file holding a dict (e.g. a ``state_dict``) needs ``key`` to
    pick the array, unless it holds exactly one. Raises :class:`CommandError` with one line
    for a missing, unreadable or unsuitable file.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".npy", ".npz", ".pt", ".pth"):
        raise CommandError(f"{path}: expected a .npy, .npz, .pt or .pth file")
    if not os.path.exists(path):
        raise CommandError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CommandError(f"{path}: is a folder, not a file")
    if extension == ".npy":
        with open(path, "rb") as file:
            if file.read(6) != b"\x93NUMPY":
                raise CommandError(f"{path}: not a .npy file (no NumPy header; see numpy.save)")
    try:
        if extension == ".npy":
            content: Any = np.load(path, allow_pickle=False)
        elif extension == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                content = {name: archive[name] for name in archive.files}
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever the parser says, the file is unreadable
        if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
            # Only tensors and containers of them are loaded: never run code from a pickle.
            raise CommandError(
                f"{path}: holds Python objects other than tensors (a whole model?); save a "
                "tensor or a state_dict instead: torch.save(model.state_dict(), path)"
            ) from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CommandError(
            f"{path}: cannot read it as a {extension} file ({type(error).__name__}: {reason})"
        ) from None
    if isinstance(content, dict):
        arrays = {
            str(name): value
            for name, value in content.items()
            if isinstance(value, (np.ndarray, torch.Tensor))
        }
        if key is not None:
            if key not in arrays:
                raise CommandError(
                    f"{path}: no array named {key!r}; it holds {_list_names(arrays)}"
                )
            content = arrays[key]
        elif len(arrays) == 1:
            content = next(iter(arrays.values()))
        else:
            matrices = {name: value for name, value in arrays.items() if value.ndim == 2}
            raise CommandError(
                f"{path}: holds {len(arrays)} arrays; pick one with --key "
                f"(2-D ones: {_list_names(matrices)})"
            )
    elif key is not None:
        raise CommandError(f"{path}: holds a single array, so --key {key!r} does not apply")
    if not isinstance(content, (np.ndarray, torch.Tensor)):
        raise CommandError(f"{path}: holds a {type(content).__name__}, not an array or tensor")
    if content.ndim != 2 or 0 in content.shape:
        raise CommandError(
            f"{path}: holds an array of shape {tuple(content.shape)}; expected a 2-D matrix "
            "(output_dim x input_dim)"
        )
    try:
        return as_weight_matrix(content, name=f"the matrix in {path}")
    except (TypeError, ValueError) as error:
        raise CommandError(str(error)) from None


def _list_names(arrays: dict[str, Any]) -> str:
    names = list(arrays)
    if not names:
        return "none"
    shown = ", ".join(names[:12])
    return shown + (f" and {len(names) - 12} more" if len(names) > 12 else "")
