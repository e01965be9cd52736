"""Collect the input statistics of a model's layers with forward hooks on calibration batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from structurednets.calibration import InputStatistics
from structurednets.linear_modules import LinearView

__all__ = ["calibration_batches", "collect_input_statistics", "run_batch"]


def calibration_batches(calibration: object, reusable: bool) -> Iterable[Any]:
    """``calibration`` checked to be iterable; kept in a list when it must be read more than
    once (``reusable``) and is a one-shot iterator."""
    if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise TypeError(
            "calibration must be an iterable of batches (e.g. a list of tensors or a "
            f"DataLoader), got {type(calibration).__name__}; wrap a single batch in a list"
        )
    if reusable and isinstance(calibration, Iterator):
        return list(calibration)
    return calibration


def run_batch(model: nn.Module, batch: object) -> None:
    """Call ``model`` on one calibration batch: a tensor as ``model(batch)``, a tuple or list
    as ``model(*batch)``, a mapping (tokenizer outputs) as ``model(**batch)``."""
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        raise TypeError(
            "each calibration batch must be a tensor, a tuple/list of arguments or a dict of "
            f"keyword arguments, got {type(batch).__name__}"
        )


def collect_input_statistics(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module, LinearView]],
    batches: Iterable[Any],
    damping: float,
) -> tuple[dict[str, InputStatistics], list[str]]:
    """One pass over ``batches`` without gradients and in eval mode (each module's training
    flag restored afterwards), with a forward pre-hook on each of ``layers``.

    Returns the statistics by layer name and the names in the order the layers were first
    called. Raises ``ValueError`` naming the layers that no batch reached, or the batch and
    layer whose inputs were bad.
    """
    statistics = {
        name: InputStatistics(
            view.input_dim, damping=damping, name=f"the inputs of layer {name or '(model)'!r}"
        )
        for name, _, view in layers
    }
    order: list[str] = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args:
                raise TypeError(f"layer {name!r} was called without a positional input")
            if name not in order:
                order.append(name)
            statistics[name].update(args[0])

        return hook

    modes = {module: module.training for module in model.modules()}
    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module, _ in layers]
    nb_batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for nb_batches, batch in enumerate(batches, start=1):  # noqa: B007
                run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if nb_batches == 0:
        raise ValueError("calibration holds no batches; pass at least one")
    missing = [name or "(model)" for name, _, _ in layers if statistics[name].nb_samples == 0]
    if missing:
        raise ValueError(
            f"the calibration batches never reached the selected layer(s) {missing}; "
            "exclude them (exclude=...) or pass batches that run through them"
        )
    return statistics, order
