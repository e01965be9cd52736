"""Replace the ``nn.Linear`` modules of a model by structured layers fitted to their weights.

>>> import structurednets
>>> compressed, report = structurednets.compress(model, "lowrank", 0.1)  # doctest: +SKIP
>>> print(report)  # doctest: +SKIP

With ``calibration=batches`` each layer is fitted to the inputs it sees on those batches
(the output error, see :mod:`structurednets.calibration`) instead of its weight alone.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from torch import nn

from structurednets.allocation import allocate_layers
from structurednets.approximation import (
    BEST,
    Approximation,
    CostTooHighError,
    NoStructureFitsError,
    approximate,
    check_cost_ratio,
    structure_names,
)
from structurednets.calibration import DEFAULT_DAMPING
from structurednets.calibration_hooks import (
    calibration_batches,
    collect_input_statistics,
    output_sensitivities,
)
from structurednets.compression_report import CompressedLayer, CompressionReport, SkippedLayer
from structurednets.layers.layer_helpers import get_nb_model_parameters
from structurednets.linear_modules import LinearView, linear_view, tied_parameters
from structurednets.refinement import DEFAULT_REFINEMENT_ITERATIONS, OPTIMAL, input_weighting
from structurednets.registry import get_structure
from structurednets.validation import BudgetTooSmallError, check_positive_int, check_share

UNIFORM, GLOBAL = "uniform", "global"
#: What makes a layer stay dense rather than fail the compression.
FIT_FAILURES = (BudgetTooSmallError, NoStructureFitsError, CostTooHighError)

__all__ = [
    "CompressedLayer",
    "CompressionReport",
    "CompressionResult",
    "SkippedLayer",
    "compress",
]


class CompressionResult(NamedTuple):
    """What :func:`compress` returns: ``model, report = compress(...)``."""

    model: nn.Module
    report: CompressionReport


def _patterns(name: str, value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(f"{name} must be a glob pattern or a list of them, got {value!r}")
    return patterns


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _select(
    model: nn.Module,
    include: tuple[str, ...] | None,
    exclude: tuple[str, ...] | None,
    min_size: int | None,
) -> tuple[list[tuple[str, nn.Module, LinearView]], list[SkippedLayer]]:
    """The modules to replace, and those selected but left alone (with the reason)."""
    linears = [(name, m, view) for name, m in model.named_modules() if (view := linear_view(m))]
    if not linears:
        raise ValueError(
            f"the model has no nn.Linear module (nor a GPT-2-style Conv1D) to compress "
            f"({type(model).__name__})"
        )
    selected = [
        (name, module, view)
        for name, module, view in linears
        if (include is None or _matches(name, include))
        and not (exclude is not None and _matches(name, exclude))
        and (min_size is None or view.input_dim * view.output_dim >= min_size)
    ]
    if not selected:
        names = ", ".join(repr(name) for name, _, _ in linears[:20])
        more = f" and {len(linears) - 20} more" if len(linears) > 20 else ""
        raise ValueError(
            f"no nn.Linear module matches include={include!r}, exclude={exclude!r}, "
            f"min_size={min_size!r}; the model's nn.Linear modules are {names}{more}"
        )
    reasons = _reasons_to_keep(model, include)
    kept = [
        SkippedLayer(name, view.input_dim, view.output_dim, reasons[id(module)])
        for name, module, view in selected
        if id(module) in reasons
    ]
    return [each for each in selected if id(each[1]) not in reasons], kept


def _reasons_to_keep(model: nn.Module, include: tuple[str, ...] | None) -> dict[int, str]:
    """Modules that stay dense by default: weights tied to another module's (a replaced
    layer would untie them), and the output embeddings (LM head) unless ``include`` names it."""
    reasons: dict[int, str] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for names in tied_parameters(model).values():
        owners = {id(modules[name.rpartition(".")[0]]) for name in names}
        if len(owners) > 1:  # one module used at two places is replaced at both
            for name in names:
                others = ", ".join(repr(other) for other in names if other != name)
                reasons[id(modules[name.rpartition(".")[0]])] = f"its weight is tied to {others}"
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    if isinstance(head, nn.Module) and id(head) not in reasons:
        head_name = next((n for n, m in modules.items() if m is head), "")
        if include is None or head_name not in include:
            reasons[id(head)] = (
                "it is the model's output embeddings (LM head); include it by its exact name "
                "to compress it"
            )
    return reasons


def _check_allocation(
    allocation: object, share: float, min_share: object, max_share: object
) -> tuple[float, float]:
    """``(min_share, max_share)`` with their defaults; raises for bad values."""
    if allocation not in (UNIFORM, GLOBAL):
        raise ValueError(f"allocation must be 'uniform' or 'global', got {allocation!r}")
    if allocation == UNIFORM:
        if min_share is not None or max_share is not None:
            raise ValueError("min_share and max_share need allocation='global'")
        return share, share
    low = 1e-12 if min_share is None else check_share(min_share, "min_share")
    high = 1.0 if max_share is None else check_share(max_share, "max_share")
    if not low <= share <= high:
        raise ValueError(
            f"min_share <= nb_params_share <= max_share must hold, got min_share={min_share!r}, "
            f"nb_params_share={share!r}, max_share={max_share!r}"
        )
    return low, high


def _replace(model: nn.Module, replacements: Mapping[int, nn.Module]) -> None:
    """Swap every reference to a replaced module, including shared ones."""
    for module in model.modules():
        # _modules, not named_children(): the latter lists a module shared twice only once
        for child_name, child in list(module._modules.items()):
            if id(child) in replacements:
                setattr(module, child_name, replacements[id(child)])


def compress(
    model: nn.Module,
    structure: str | Sequence[str],
    nb_params_share: float,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_size: int | None = None,
    inplace: bool = False,
    structure_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
    calibration: Iterable[Any] | None = None,
    sequential: bool = False,
    damping: float = DEFAULT_DAMPING,
    refinement_iterations: int = DEFAULT_REFINEMENT_ITERATIONS,
    max_cost_ratio: float | None = 1.0,
    allocation: str = "uniform",
    min_share: float | None = None,
    max_share: float | None = None,
    **options: Any,
) -> CompressionResult:
    """Replace ``nn.Linear`` modules of ``model`` by structured layers fitted to their weights.

    Each selected layer's weight is approximated (see :func:`structurednets.approximate`) and
    its bias copied; the new layer has the old one's dtype, device, training mode and
    ``requires_grad``. Fine-tune the result with any training loop, e.g.
    :func:`structurednets.training_helpers.train_with_decreasing_lr`.

    Args:
        model: any module; modules whose type is exactly ``nn.Linear``, and the transposed
            ``Conv1D`` of GPT-2-style ``transformers`` models, are considered. By default a
            layer whose weight is tied to another module's, and the model's output
            embeddings (``model.get_output_embeddings()``, an LM head), stay dense and are
            listed in ``report.skipped``.
        structure: a structure name, ``"best"`` (per layer, the installed structure with the
            smallest relative error) or a list of names to choose from per layer.
        nb_params_share: share in (0, 1] of each layer's ``in_features * out_features``
            weights that its structured weight may hold.
        include: glob patterns over qualified module names (``"encoder.*"``, ``"fc?"``); only
            matching layers are replaced. Default: all.
        exclude: glob patterns of layers to leave dense (applied after ``include``).
        min_size: leave layers with fewer than this many weight entries dense.
        inplace: modify ``model`` itself instead of a deep copy. If ``model`` is itself an
            ``nn.Linear``, the returned model is the new layer either way.
        structure_options: options per structure name, e.g. ``{"lowrank": {"rank": 8}}``.
        progress: called with a line of text per layer.
        calibration: batches to run the model on (no gradients, in eval mode, training mode
            restored afterwards): a tensor batch is called as ``model(batch)``, a tuple or
            list as ``model(*batch)``, a dict (e.g. tokenizer outputs) as ``model(**batch)``.
            Forward hooks collect each selected layer's input second moment in one pass, and
            each layer is fitted to its own inputs (``approximate(..., inputs=...)``).
        sequential: with ``calibration``, fit the layers in the order the model calls them,
            each to the inputs it receives once the layers before it are compressed (one
            pass over the batches per layer; an iterator of batches is kept in a list).
        damping: relative damping of each layer's input second moment (see
            :mod:`structurednets.calibration`).
        refinement_iterations: L-BFGS iterations of the calibrated refinement.
        max_cost_ratio: a bound on each new layer's forward plus backward multiply-adds
            (batch 256) against the dense layer's (see ``approximate``). By default 1: no
            layer is made costlier than the one it replaces; a layer that cannot be fitted
            within the bound stays dense (``report.skipped``). ``None``: no bound.
        allocation: ``"uniform"`` gives every layer ``nb_params_share``; ``"global"`` gives
            the layers together ``nb_params_share`` of their weights, spread where it lowers
            the sum of the layers' squared relative errors most, each weighted (with
            calibration) by how much the layer's output errors move the model's output, and
            with several structures picks each layer's structure too (see
            :mod:`structurednets.allocation`; ``report.allocation_seconds`` is its cost).
        min_share, max_share: with ``"global"``, the least and most share any one layer may
            get (default: the structure's smallest form, and 1).
        **options: the structure's own options (single structure only).

    Returns:
        ``(model, report)``: the compressed model and a :class:`CompressionReport`. A layer
        whose budget is too small for the structure is kept dense and listed in
        ``report.skipped``.

    Raises:
        ValueError: no ``nn.Linear`` matches the selection, or a bad share or ``min_size``;
            calibration batches that never reach a selected layer (named; the model is left
            untouched).
        UnknownStructureError: a structure name is not installed.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    nb_params_share = check_share(nb_params_share)
    max_cost_ratio = check_cost_ratio(max_cost_ratio)
    if min_size is not None:
        min_size = check_positive_int("min_size", min_size)
    min_share, max_share = _check_allocation(allocation, nb_params_share, min_share, max_share)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    selected, kept = _select(
        model, _patterns("include", include), _patterns("exclude", exclude), min_size
    )
    model_before = get_nb_model_parameters(model)
    structure_names(structure)  # unknown names, or 'best' with nothing installed, fail first
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be True or False, got {sequential!r}")
    if sequential and calibration is None:
        raise ValueError("sequential=True needs calibration batches (calibration=...)")
    batches = None if calibration is None else calibration_batches(calibration, sequential)
    if not inplace:
        # Copy the whole model once (shared modules stay shared) and find the layers by name.
        model = copy.deepcopy(model)
        copied = dict(model.named_modules())
        selected = [(name, copied[name], linear_view(copied[name])) for name, _, _ in selected]
    say = progress or (lambda line: None)
    several = not (isinstance(structure, str) and structure != BEST)
    say_tried = (lambda line: say(f"    {line}")) if several else None

    statistics = {}
    if batches is not None:
        # Every selected layer must be reached before anything is replaced.
        statistics, order = collect_input_statistics(model, selected, batches, damping)
        if sequential:
            selected = sorted(selected, key=lambda item: order.index(item[0]))

    def fit(
        view: LinearView,
        name: str,
        share: float,
        inputs: object,
        iterations: int = refinement_iterations,
        **more: Any,
    ) -> Approximation:
        calibrated = {} if inputs is None else {"inputs": inputs}
        return approximate(
            view.weight,
            name,
            share,
            bias=view.bias,
            dtype=view.weight.dtype,
            device=view.weight.device,
            structure_options=structure_options,
            max_cost_ratio=max_cost_ratio,
            refinement_iterations=iterations,
            **calibrated,
            **more,
        )

    plan, allocation_seconds = None, 0.0
    if allocation == GLOBAL:
        views = {name: view for name, _, view in selected}
        failures = (ValueError, RuntimeError, ArithmeticError) if several else FIT_FAILURES

        def fit_form(layer: str, name: str, share: float) -> Approximation | None:
            # Without the calibrated refinement (the chosen form gets it once, below); the
            # unrefined output error stands for the refined one in the curve.
            try:
                return fit(views[layer], name, share, statistics.get(layer), 0, **options)
            except failures:  # this form does not exist; the layer's others may
                return None

        names, _ = structure_names(structure)
        weights = [(name, view.weight) for name, _, view in selected]
        sensitivities, started = None, time.perf_counter()
        if batches is not None:
            say("allocation: how much each layer's errors move the model's outputs ...")
            sensitivities = output_sensitivities(model, selected, batches)
        plan = allocate_layers(
            weights,
            names,
            nb_params_share,
            min_share,
            max_share,
            statistics,
            fit_form,
            say,
            sensitivities,
        )
        allocation_seconds = time.perf_counter() - started

    replacements: dict[int, nn.Module] = {}
    layers: list[CompressedLayer] = []
    skipped: list[SkippedLayer] = list(kept)
    for each in kept:
        say(f"{each.name} ({each.output_dim}x{each.input_dim}): kept dense, {each.reason}")
    for index, (name, linear, view) in enumerate(selected, start=1):
        label = name or "(model)"
        shape = f"{view.output_dim}x{view.input_dim}"
        weight = view.weight
        layer_structure, layer_share, result = structure, nb_params_share, None
        if plan is not None and name in plan.kept_dense:
            reason = plan.kept_dense[name]
            skipped.append(SkippedLayer(name, view.input_dim, view.output_dim, reason))
            say(f"[{index}/{len(selected)}] {label} ({shape}): kept dense, {reason}")
            continue
        if plan is not None:
            choice = plan.choices[name]
            layer_structure, layer_share = choice.structure, choice.nb_params_share
            # a curve's fit is the layer's fit unless it skipped the calibrated refinement
            weighting = input_weighting(get_structure(layer_structure).layer_class)
            result = choice.fitted if batches is None or weighting == OPTIMAL else None
        if batches is not None and sequential and index > 1 and replacements:
            _replace(model, replacements)  # so far: the layers before this one
            statistics, _ = collect_input_statistics(
                model, [(name, linear, view)], batches, damping
            )
            result = None  # the allocation's fit saw other inputs
        try:
            if result is None:
                result = fit(
                    view,
                    layer_structure,
                    layer_share,
                    statistics.get(name),
                    progress=say_tried,
                    **options,
                )
        except FIT_FAILURES as error:
            skipped.append(SkippedLayer(name, view.input_dim, view.output_dim, str(error)))
            say(f"[{index}/{len(selected)}] {label} ({shape}): kept dense, {error}")
            continue
        layer = result.layer
        layer.train(linear.training)
        layer.requires_grad_(weight.requires_grad)
        replacements[id(linear)] = layer
        before = get_nb_model_parameters(linear)
        layers.append(
            CompressedLayer(
                name=name,
                input_dim=view.input_dim,
                output_dim=view.output_dim,
                structure=result.structure,
                nb_parameters_before=before,
                nb_parameters_after=result.nb_parameters,
                relative_error=result.relative_error,
                seconds=result.seconds,
                output_relative_error=result.output_relative_error,
                cost_ratio=result.cost_ratio,
                nb_params_share=layer_share,
            )
        )
        output = ""
        if result.output_relative_error is not None:
            output = f", output error {result.output_relative_error:.4g}"
        say(
            f"[{index}/{len(selected)}] {label} ({shape}): {result.structure}, relative error "
            f"{result.relative_error:.4g}{output}, {before} -> {result.nb_parameters} "
            f"parameters, {result.seconds:.2f} s"
        )
    if id(model) in replacements:  # the model is itself an nn.Linear
        model = replacements[id(model)]
    else:
        _replace(model, replacements)
    report = CompressionReport(
        layers=tuple(layers),
        skipped=tuple(skipped),
        model_nb_parameters_before=model_before,
        model_nb_parameters_after=get_nb_model_parameters(model),
        seconds=time.perf_counter() - start,
        allocation=allocation,
        allocation_seconds=allocation_seconds,
        weight_budget=None if plan is None else plan.budget,
        allocated_weights=None if plan is None else plan.nb_weights,
    )
    return CompressionResult(model, report)
