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
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from structurednets.approximation import (
    BEST,
    CostTooHighError,
    NoStructureFitsError,
    approximate,
    check_cost_ratio,
    format_error,
    structure_names,
)
from structurednets.calibration import DEFAULT_DAMPING
from structurednets.calibration_hooks import calibration_batches, collect_input_statistics
from structurednets.layers.layer_helpers import get_nb_model_parameters
from structurednets.linear_modules import LinearView, linear_view, tied_parameters
from structurednets.refinement import DEFAULT_REFINEMENT_ITERATIONS
from structurednets.validation import BudgetTooSmallError, check_positive_int, check_share

__all__ = [
    "CompressedLayer",
    "CompressionReport",
    "CompressionResult",
    "SkippedLayer",
    "compress",
]


@dataclass(frozen=True)
class CompressedLayer:
    """One ``nn.Linear`` that was replaced.

    Attributes:
        name: its qualified module name in the model (``""`` for the model itself).
        input_dim, output_dim: its ``in_features`` and ``out_features``.
        structure: the structure it was replaced by.
        nb_parameters_before: the ``nn.Linear``'s parameters (weight and bias).
        nb_parameters_after: the structured layer's parameters (weight and bias).
        relative_error: ``||W_structured - W||_F / ||W||_F`` of the weight right after fitting.
        seconds: wall-clock time of the fit.
        output_relative_error: with calibration, ``||(W - W_structured) X^T||_F / ||W X^T||_F``
            on the inputs ``X`` the layer saw; ``None`` without calibration.
        cost_ratio: forward plus backward multiply-adds (batch 256) against the dense layer's;
            ``None`` for a structure that does not count its cost.
    """

    name: str
    input_dim: int
    output_dim: int
    structure: str
    nb_parameters_before: int
    nb_parameters_after: int
    relative_error: float
    seconds: float
    output_relative_error: float | None = None
    cost_ratio: float | None = None


@dataclass(frozen=True)
class SkippedLayer:
    """A selected ``nn.Linear`` that was kept dense, and why (e.g. the budget is too small)."""

    name: str
    input_dim: int
    output_dim: int
    reason: str


@dataclass(frozen=True)
class CompressionReport:
    """What :func:`compress` did. ``str(report)`` is a table.

    Attributes:
        layers: the replaced layers, in module order (in call order with ``sequential=True``).
        skipped: selected layers kept dense, with the reason.
        model_nb_parameters_before, model_nb_parameters_after: parameters of the whole model.
        seconds: wall-clock time of the whole compression.
    """

    layers: tuple[CompressedLayer, ...]
    skipped: tuple[SkippedLayer, ...]
    model_nb_parameters_before: int
    model_nb_parameters_after: int
    seconds: float

    @property
    def nb_parameters_before(self) -> int:
        """Parameters of the replaced layers before (weights and biases)."""
        return sum(layer.nb_parameters_before for layer in self.layers)

    @property
    def nb_parameters_after(self) -> int:
        """Parameters of the replaced layers after (weights and biases)."""
        return sum(layer.nb_parameters_after for layer in self.layers)

    def __str__(self) -> str:
        names = [layer.name or "(model)" for layer in self.layers]
        width = max([len("layer"), len("total"), *(len(name) for name in names)])
        calibrated = any(layer.output_relative_error is not None for layer in self.layers)
        header = (
            f"{'layer':<{width}} {'out x in':>11} {'structure':<10} {'params before':>13} "
            f"{'params after':>12} {'cost':>5} {'rel. error':>10}"
        )
        if calibrated:
            header += f" {'out error':>10}"
        lines = [header, "-" * len(header)]
        for name, layer in zip(names, self.layers, strict=True):
            shape = f"{layer.output_dim}x{layer.input_dim}"
            line = (
                f"{name:<{width}} {shape:>11} {layer.structure:<10} "
                f"{layer.nb_parameters_before:>13} {layer.nb_parameters_after:>12} "
                f"{'-' if layer.cost_ratio is None else f'{layer.cost_ratio:.2f}':>5} "
                f"{format_error(layer.relative_error)}"
            )
            if calibrated:
                output = layer.output_relative_error
                line += f" {'-':>10}" if output is None else f" {format_error(output)}"
            lines.append(line)
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<{width}} {'':>11} {'':<10} {self.nb_parameters_before:>13} "
            f"{self.nb_parameters_after:>12}"
        )
        before, after = self.model_nb_parameters_before, self.model_nb_parameters_after
        lines.append(
            f"model: {before} -> {after} parameters ({after / max(before, 1):.1%}); "
            f"{len(self.layers)} layer(s) replaced in {self.seconds:.2f} s"
        )
        for skipped in self.skipped:
            lines.append(
                f"kept dense: {skipped.name or '(model)'} ({skipped.output_dim}x{skipped.input_dim}): "
                f"{skipped.reason}"
            )
        return "\n".join(lines)


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

    replacements: dict[int, nn.Module] = {}
    layers: list[CompressedLayer] = []
    skipped: list[SkippedLayer] = list(kept)
    for each in kept:
        say(f"{each.name} ({each.output_dim}x{each.input_dim}): kept dense, {each.reason}")
    for index, (name, linear, view) in enumerate(selected, start=1):
        label = name or "(model)"
        shape = f"{view.output_dim}x{view.input_dim}"
        weight = view.weight
        calibrated = {}
        if batches is not None:
            if sequential and index > 1 and replacements:
                _replace(model, replacements)  # so far: the layers before this one
                statistics, _ = collect_input_statistics(
                    model, [(name, linear, view)], batches, damping
                )
            calibrated = {
                "inputs": statistics[name],
                "refinement_iterations": refinement_iterations,
            }
        try:
            result = approximate(
                weight,
                structure,
                nb_params_share,
                bias=view.bias,
                dtype=weight.dtype,
                device=weight.device,
                structure_options=structure_options,
                progress=say_tried,
                max_cost_ratio=max_cost_ratio,
                **calibrated,
                **options,
            )
        except (BudgetTooSmallError, NoStructureFitsError, CostTooHighError) as error:
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
    )
    return CompressionResult(model, report)
