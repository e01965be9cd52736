"""Collect the input statistics of a model's layers with forward hooks on calibration batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from structurednets.calibration import InputStatistics
from structurednets.linear_modules import LinearView

__all__ = [
    "calibration_batches",
    "collect_input_statistics",
    "first_tensor",
    "output_sensitivities",
    "run_batch",
]


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


def run_batch(model: nn.Module, batch: object) -> object:
    """Call ``model`` on one calibration batch: a tensor as ``model(batch)``, a tuple or list
    as ``model(*batch)``, a mapping (tokenizer outputs) as ``model(**batch)``; returns what
    the model returns."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(
        "each calibration batch must be a tensor, a tuple/list of arguments or a dict of "
        f"keyword arguments, got {type(batch).__name__}"
    )


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block, each module's training flag restored after."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


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

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module, _ in layers]
    nb_batches = 0
    try:
        with _evaluating(model), torch.no_grad():
            for nb_batches, batch in enumerate(batches, start=1):  # noqa: B007
                run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if nb_batches == 0:
        raise ValueError("calibration holds no batches; pass at least one")
    missing = [name or "(model)" for name, _, _ in layers if statistics[name].nb_samples == 0]
    if missing:
        raise ValueError(
            f"the calibration batches never reached the selected layer(s) {missing}; "
            "exclude them (exclude=...) or pass batches that run through them"
        )
    return statistics, order


def first_tensor(output: object) -> torch.Tensor | None:
    """The model's main output: the tensor itself, or the first tensor of a tuple, list or
    mapping (a ``transformers`` ``ModelOutput``: ``last_hidden_state`` or ``logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output
    if isinstance(values, Iterable) and not isinstance(values, (str, bytes)):
        return next((value for value in values if isinstance(value, torch.Tensor)), None)
    return None


def output_sensitivities(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module, LinearView]],
    batches: Iterable[Any],
    seed: int = 0,
) -> dict[str, float]:
    """How much the model's output moves per unit of each layer's squared relative error.

    The output is the model's first tensor (:func:`first_tensor`); a layer it does not
    depend on (e.g. BERT's pooler against ``last_hidden_state``) gets 0.

    For layer ``l`` with outputs ``Y`` (``n`` rows of width ``d``) on a batch, an error
    ``E`` spread evenly over the directions changes the model's output ``F`` by
    ``E[||J E||^2] = (||E||^2 / ||Y||^2) * (||Y||^2 / (n d)) * ||J||_F^2`` to first order,
    ``J = dF/dY``; ``||J||_F^2`` is estimated by ``||J^T R||^2`` for one Gaussian ``R`` of
    ``F``'s shape per batch (Hutchinson). The result, summed over the batches, is the factor
    by which a layer's squared relative output error counts in the model's. One forward and
    one backward per batch, in eval mode; the parameters get no gradients.
    """
    sums = {name: 0.0 for name, _, _ in layers}
    deltas: dict[str, torch.Tensor] = {}
    energies: dict[str, float] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            delta = torch.zeros_like(output, requires_grad=True)
            deltas[name] = delta
            energies[name] = float(output.detach().double().pow(2).mean())
            return output + delta

        return hook

    generator = torch.Generator().manual_seed(seed)
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    handles = [module.register_forward_hook(hook_for(name)) for name, module, _ in layers]
    try:
        model.requires_grad_(False)
        with _evaluating(model), torch.enable_grad():
            for index, batch in enumerate(batches):
                deltas.clear()
                output = first_tensor(run_batch(model, batch))
                if output is None or not output.is_floating_point():
                    raise ValueError(
                        "the global allocation weighs each layer by how much the model's output "
                        f"moves, but the model returned no floating-point tensor on batch {index}"
                    )
                probe = torch.randn(output.shape, generator=generator, dtype=torch.float64)
                (output * probe.to(output)).sum().backward()
                for name, delta in deltas.items():
                    if delta.grad is not None:
                        sums[name] += energies[name] * float(delta.grad.double().pow(2).sum())
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
    return sums
