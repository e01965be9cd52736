"""Scratch memory: temporaries of one kernel call, kept for the next call of the same thread.

On CPU, fresh multi-megabyte tensors cost page faults on every call (glibc hands big blocks
back to the system and maps them again), which costs about as much as the arithmetic of an
LDR product: measured with ``structurednets bench`` at 512 x 512 (r = 4) and 1024 x 1024
(r = 8), batch 256, one thread, forward plus backward is 15% and 12% slower without it.

Rules that make this safe:

- a buffer is used only until the kernel that took it returns: it is never returned from a
  kernel or saved for a backward pass (those tensors are fresh and belong to the autograd
  graph), and a name serves one tensor at a time;
- the kernels run inside ``torch.library`` custom operators, so ``torch.compile`` never sees
  the buffers (they exist only when the operators run eagerly);
- each thread has its own buffers (``threading.local``): threads never share one;
- only CPU tensors between 1 MiB and 256 MiB (float32) go through here; others are
  allocated as usual.

Lifetime: a thread keeps its buffers, at most about ``b + 10`` matrices of the largest layer it
ran (``b`` the chain length), until it ends or calls :func:`release_scratch`.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["release_scratch", "scratch"]

_MIN_NUMEL = 1 << 18
_MAX_NUMEL = 1 << 26


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.by_name: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


_BUFFERS = _Buffers()


def scratch(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``shape`` tensor with ``like``'s dtype and device, reused under
    ``name`` by the calling thread (see the module's rules)."""
    numel = math.prod(shape)
    if like.device.type != "cpu" or not _MIN_NUMEL <= numel <= _MAX_NUMEL:
        return like.new_empty(shape)
    key = (name, like.dtype, like.device)
    buffer = _BUFFERS.by_name.get(key)
    if buffer is None or buffer.numel() < numel:
        _BUFFERS.by_name.pop(key, None)  # free the old one first
        buffer = _BUFFERS.by_name[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)


def release_scratch() -> None:
    """Free the calling thread's scratch buffers."""
    _BUFFERS.by_name.clear()
