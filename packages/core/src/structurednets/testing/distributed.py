"""Train a layer with DistributedDataParallel and FSDP in 2 local processes (gloo, loopback).

Used by the conformance kit; each rank trains on its own half of the data, and the final
parameters of every rank come back to the caller.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

__all__ = ["DistributedRun", "train_data_parallel"]


@dataclass(frozen=True)
class DistributedRun:
    """Final parameters (name -> full tensor) of each rank, per wrapper ("ddp", "fsdp")."""

    ddp: list[dict[str, torch.Tensor]]
    fsdp: list[dict[str, torch.Tensor]]


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _full(parameter: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(parameter, "full_tensor", None)  # a DTensor shard under FSDP
    return (full_tensor() if full_tensor else parameter).detach().clone()


def _train(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, steps: int, lr: float) -> None:
    optimiser = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(X), Y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def _worker(rank: int, world_size: int, port: int, folder: str) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        layer, X, Y, steps, lr = torch.load(Path(folder) / "payload.pt", weights_only=False)
        X_rank, Y_rank = X.chunk(world_size)[rank], Y.chunk(world_size)[rank]
        states = {}
        ddp_layer = copy.deepcopy(layer)
        _train(nn.parallel.DistributedDataParallel(ddp_layer), X_rank, Y_rank, steps, lr)
        states["ddp"] = {name: _full(p) for name, p in ddp_layer.named_parameters()}
        fsdp_layer = copy.deepcopy(layer)
        fully_shard(fsdp_layer)
        _train(fsdp_layer, X_rank, Y_rank, steps, lr)
        states["fsdp"] = {name: _full(p) for name, p in fsdp_layer.named_parameters()}
        torch.save(states, Path(folder) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    (Path(folder) / f"rank{rank}.done").touch()


def train_data_parallel(
    layer: nn.Module,
    X: torch.Tensor,
    Y: torch.Tensor,
    steps: int = 3,
    lr: float = 0.05,
    world_size: int = 2,
    timeout: float = 180.0,
) -> DistributedRun:
    """Train copies of ``layer`` with SGD and an MSE loss, the batch split across ranks.

    Each of ``world_size`` spawned processes trains on ``X.chunk(world_size)[rank]`` for
    ``steps`` steps, once wrapped in ``DistributedDataParallel`` and once sharded with
    ``fully_shard`` (FSDP2). With equal chunks, the result should equal one process training
    on the whole batch. Processes still running after ``timeout`` seconds are killed.
    """
    with tempfile.TemporaryDirectory(prefix="structurednets-ddp-") as folder:
        torch.save((layer, X, Y, steps, lr), Path(folder) / "payload.pt")
        context = mp.start_processes(
            _worker,
            args=(world_size, _free_loopback_port(), folder),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    raise AssertionError(f"distributed training did not finish in {timeout:.0f} s")
        except mp.ProcessExitedException:
            # gloo sometimes aborts a process while the interpreter shuts down, after the
            # work is done and the process group destroyed; only a crash before that counts.
            if not all((Path(folder) / f"rank{r}.done").exists() for r in range(world_size)):
                raise
        states = [
            torch.load(Path(folder) / f"rank{rank}.pt", weights_only=False)
            for rank in range(world_size)
        ]
    return DistributedRun(ddp=[s["ddp"] for s in states], fsdp=[s["fsdp"] for s in states])
