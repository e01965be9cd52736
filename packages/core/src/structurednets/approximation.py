"""Fit a structured layer to a given matrix, with one structure or the best of several.

>>> import numpy as np, structurednets
>>> W = np.random.default_rng(0).standard_normal((256, 512))
>>> result = structurednets.approximate(W, "lowrank", 0.1)  # doctest: +SKIP
>>> result.relative_error, result.nb_parameters  # doctest: +SKIP
(0.86..., 13056)
>>> best = structurednets.approximate(W, "best", 0.1)  # doctest: +SKIP
>>> [(each.structure, each.relative_error) for each in best.tried]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from structurednets.calibration import DEFAULT_DAMPING, InputStatistics, as_input_statistics
from structurednets.layers.layer_helpers import default_dtype
from structurednets.layers.structured_layer import StructuredLayer
from structurednets.numerics import relative_error
from structurednets.refinement import (
    DEFAULT_REFINEMENT_ITERATIONS,
    OPTIMAL,
    input_weighting,
    refine_to_inputs,
)
from structurednets.registry import available, create, get_structure
from structurednets.validation import BudgetTooSmallError, as_matrix, as_vector, check_share

__all__ = [
    "Approximation",
    "CostTooHighError",
    "NoStructureFitsError",
    "SkippedStructure",
    "approximate",
    "as_weight_matrix",
    "format_error",
    "relative_error",
    "structure_names",
]

#: The ``structure`` argument that tries every installed structure.
BEST = "best"
#: Refinement iterations each structure gets when several are tried with calibration; the
#: chosen one gets the rest of ``refinement_iterations``. On MiniLM layers the order after
#: 10 iterations was the order after 100 but for near ties, at a tenth of the time.
SCREENING_ITERATIONS = 10


@dataclass(frozen=True)
class SkippedStructure:
    """A structure that was tried and gave no layer.

    Attributes:
        structure: its registered name.
        nb_params_share: the share it was tried at.
        reason: why, in words (e.g. the :class:`BudgetTooSmallError` message).
        min_share: the smallest share that would work, where the structure said so.
    """

    structure: str
    nb_params_share: float
    reason: str
    min_share: float | None = None

    @property
    def ok(self) -> bool:
        """Always ``False``: no layer was built (see :attr:`Approximation.ok`)."""
        return False


@dataclass(frozen=True)
class Approximation:
    """A structured layer fitted to a matrix ``W`` (output_dim x input_dim).

    Attributes:
        structure: the structure's registered name.
        nb_params_share: the share the layer was built with.
        layer: the fitted layer; ``layer.to_dense()`` approximates ``W``.
        relative_error: ``||layer.to_dense() - W||_F / ||W||_F``, in float64 (for an all-zero
            ``W``, the absolute error ``||layer.to_dense()||_F``).
        nb_parameters: trainable scalars of the layer (bias included when it has one).
        seconds: wall-clock time of the fit (building the layer from ``W``, and the
            calibrated refinement if any).
        tried: every structure tried, in the order tried: :class:`Approximation` results and
            :class:`SkippedStructure` entries. For a single structure it holds that one.
        output_relative_error: with calibration, ``||(W - W~) X^T||_F / ||W X^T||_F`` for the
            calibration inputs ``X`` (or the same under the given ``input_covariance``, undamped);
            ``None`` without calibration.
        cost_ratio: the layer's forward plus backward multiply-adds for a batch of 256
            against ``nn.Linear`` of the same shape (:meth:`StructuredLayer.cost_ratio`).
    """

    structure: str
    nb_params_share: float
    layer: StructuredLayer
    relative_error: float
    nb_parameters: int
    seconds: float
    tried: tuple[Approximation | SkippedStructure, ...] = ()
    output_relative_error: float | None = None
    cost_ratio: float | None = None

    @property
    def ok(self) -> bool:
        """Always ``True``: a layer was built (see :attr:`SkippedStructure.ok`)."""
        return True

    @property
    def skipped(self) -> tuple[SkippedStructure, ...]:
        """The structures among :attr:`tried` that gave no layer."""
        return tuple(each for each in self.tried if isinstance(each, SkippedStructure))

    def __str__(self) -> str:
        output = ""
        if self.output_relative_error is not None:
            output = f", output error {self.output_relative_error:.4g}"
        cost = "" if self.cost_ratio is None else f", cost {self.cost_ratio:.2f}x dense"
        return (
            f"{self.structure} at share {self.nb_params_share:g}: relative error "
            f"{self.relative_error:.4g}{output}, {self.nb_parameters} parameters{cost}, "
            f"{self.seconds:.3g} s"
        )

    @property
    def score(self) -> float:
        """The error a choice among structures minimises: the output error with calibration,
        else the weight error."""
        if self.output_relative_error is not None:
            return self.output_relative_error
        return self.relative_error


class NoStructureFitsError(ValueError):
    """None of the structures tried could build a layer (budget too small, or all failed).

    Attributes:
        skipped: one :class:`SkippedStructure` per structure tried.
    """

    def __init__(self, message: str, skipped: Sequence[SkippedStructure]):
        super().__init__(message)
        self.skipped = tuple(skipped)


def as_weight_matrix(matrix: object, name: str = "matrix") -> torch.Tensor:
    """Check a 2-D real finite numpy array or tensor; return a float64 CPU copy.

    Raises ``TypeError``/``ValueError`` whose message names ``name``, the expected and the
    given type or shape.
    """
    if not isinstance(matrix, (np.ndarray, torch.Tensor)):
        raise TypeError(
            f"{name} must be a 2-D numpy array or torch tensor (output_dim x input_dim), "
            f"got {type(matrix).__name__}"
        )
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(
            f"{name} must be a 2-D, non-empty matrix (output_dim x input_dim), "
            f"got shape {tuple(matrix.shape)}"
        )
    return as_matrix(name, matrix, matrix.shape[0], matrix.shape[1])


def format_error(value: float) -> str:
    """A relative error for tables: ``0.2144``, or ``8.54e-05`` below 1e-3 (width 10)."""
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:>10.4f}"
    return f"{value:>10.2e}"


def _fit(
    name: str,  # canonical
    target: torch.Tensor,
    nb_params_share: float,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
    options: Mapping[str, Any],
    statistics: InputStatistics | None = None,
    refinement_iterations: int = DEFAULT_REFINEMENT_ITERATIONS,
    max_cost_ratio: float | None = None,
) -> Approximation:
    output_dim, input_dim = target.shape
    layer_class = get_structure(name).layer_class
    # Parameters are created in the default dtype; float32 and float64 are built directly
    # so that a float64 layer keeps the float64 fit, other dtypes are converted afterwards.
    build_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    weighting = None if statistics is None else input_weighting(get_structure(name).layer_class)
    extra = {} if weighting is None else {"input_statistics": statistics}
    if max_cost_ratio is not None and getattr(layer_class, "accepts_max_cost_ratio", False):
        extra["max_cost_ratio"] = max_cost_ratio  # its own layout search respects the bound
    start = time.perf_counter()
    with default_dtype(build_dtype):
        layer = create(
            name,
            input_dim,
            output_dim,
            nb_params_share,
            use_bias=bias is not None,
            initial_weight_matrix=target,
            initial_bias=bias,
            **extra,
            **options,
        )
        if statistics is not None and weighting != OPTIMAL and refinement_iterations > 0:
            refine_to_inputs(layer, target, statistics, max_iterations=refinement_iterations)
    seconds = time.perf_counter() - start
    layer = layer.to(device=device, dtype=dtype)
    cost_ratio = _cost_ratio(layer)
    if max_cost_ratio is not None and cost_ratio is not None and cost_ratio > max_cost_ratio:
        raise CostTooHighError(
            f"the fitted {name} layer costs {cost_ratio:.3g}x the multiply-adds of nn.Linear, "
            f"over max_cost_ratio={max_cost_ratio:g}"
        )
    return _measured(name, nb_params_share, layer, target, statistics, seconds, cost_ratio)


def _measured(
    name: str,
    nb_params_share: float,
    layer: StructuredLayer,
    target: torch.Tensor,
    statistics: InputStatistics | None,
    seconds: float,
    cost_ratio: float | None,
) -> Approximation:
    with torch.no_grad():
        dense = layer.to_dense()
        error = relative_error(dense, target)
        output_error = None if statistics is None else statistics.output_error(dense, target)
    return Approximation(
        structure=name,
        nb_params_share=nb_params_share,
        layer=layer,
        relative_error=error,
        nb_parameters=layer.get_nb_parameters(),
        seconds=seconds,
        output_relative_error=output_error,
        cost_ratio=cost_ratio,
    )


def _refined_further(
    result: Approximation,
    target: torch.Tensor,
    statistics: InputStatistics,
    iterations: int,
) -> Approximation:
    """``result`` after ``iterations`` more of the calibrated refinement (none for a
    structure whose calibrated fit is optimal), timed into its seconds."""
    if iterations <= 0 or input_weighting(get_structure(result.structure).layer_class) == OPTIMAL:
        return result
    start = time.perf_counter()
    refine_to_inputs(result.layer, target, statistics, max_iterations=iterations)
    seconds = result.seconds + time.perf_counter() - start
    return _measured(
        result.structure,
        result.nb_params_share,
        result.layer,
        target,
        statistics,
        seconds,
        result.cost_ratio,
    )


def _cost_ratio(layer: StructuredLayer) -> float | None:
    try:
        return layer.cost_ratio()
    except NotImplementedError:  # a third-party structure that does not count its cost
        return None


class CostTooHighError(ValueError):
    """A fitted layer costs more multiply-adds than ``max_cost_ratio`` allows."""


def check_cost_ratio(max_cost_ratio: object) -> float | None:
    """``max_cost_ratio``: ``None`` or a positive number."""
    if max_cost_ratio is None:
        return None
    if isinstance(max_cost_ratio, bool) or not isinstance(max_cost_ratio, (int, float)):
        raise TypeError(f"max_cost_ratio must be a positive number or None, got {max_cost_ratio!r}")
    if not max_cost_ratio > 0:
        raise ValueError(
            f"max_cost_ratio must be a positive number or None, got {max_cost_ratio!r}"
        )
    return float(max_cost_ratio)


def structure_names(structure: str | Sequence[str]) -> tuple[list[str], bool]:
    """Canonical names to try for ``structure`` (a name, ``"best"`` or a list), and whether
    the caller asked for a choice among several; raises for unknown names or an empty choice."""
    if isinstance(structure, str):
        if structure == BEST:
            names = available()
            if not names:
                raise NoStructureFitsError(
                    "structure='best' but no structures are installed; "
                    "e.g. pip install structurednets-lowrank",
                    [],
                )
            return names, True
        return [get_structure(structure).name], False
    if not isinstance(structure, Sequence) or not all(isinstance(s, str) for s in structure):
        raise TypeError(
            "structure must be a structure name, 'best', or a list of names, "
            f"got {structure!r} ({type(structure).__name__})"
        )
    if not structure:
        raise ValueError("structure must name at least one structure, got an empty list")
    names = []
    for each in structure:
        canonical = get_structure(each).name
        if canonical not in names:
            names.append(canonical)
    return names, True


def approximate(
    matrix: object,
    structure: str | Sequence[str],
    nb_params_share: float,
    *,
    bias: object = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    structure_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
    inputs: object = None,
    input_covariance: object = None,
    damping: float = DEFAULT_DAMPING,
    refinement_iterations: int = DEFAULT_REFINEMENT_ITERATIONS,
    max_cost_ratio: float | None = None,
    **options: Any,
) -> Approximation:
    """Fit a layer of ``structure`` to ``matrix`` within ``nb_params_share`` of its size.

    Without calibration the fit minimises the weight error ``||W - W~||_F``. With ``inputs``
    (or ``input_covariance``) it minimises the output error ``||(W - W~) X^T||_F`` on those
    inputs (see :mod:`structurednets.calibration`): a structure whose layer class advertises
    ``input_weighting`` fits in the weighted norm itself; every other one is fitted to ``W``
    and then refined (:func:`structurednets.refinement.refine_to_inputs`), never ending worse
    than its weight fit.

    Args:
        matrix: the ``(output_dim, input_dim)`` weight to approximate (numpy array or tensor,
            e.g. ``linear.weight``), real and finite.
        structure: a structure name (``"lowrank"``), ``"best"`` for every installed structure,
            or a list of names. With several, each is fitted and the one with the smallest
            relative error is returned (ties: fewer parameters, then the order tried); those
            whose budget is too small or whose fit fails are skipped with the reason recorded
            in :attr:`Approximation.tried`. With calibration, the smallest output error wins,
            each refined :data:`SCREENING_ITERATIONS` iterations; the chosen one is then
            refined the rest of ``refinement_iterations``.
        nb_params_share: share in (0, 1] of ``output_dim * input_dim`` the weight may hold.
        bias: an ``(output_dim,)`` bias for the layer; without it the layer has no bias, so
            ``layer(U) == U @ layer.to_dense().T``.
        dtype: the layer's dtype (default: ``torch.get_default_dtype()``). The fit itself is
            computed by the structure, in float64.
        device: where the layer lives (default: the CPU).
        structure_options: options per structure name, e.g. ``{"lowrank": {"rank": 8}}``, for
            a choice among several structures.
        progress: called with a line of text after each structure is tried.
        inputs: ``(n_samples, input_dim)`` floating numpy array or tensor of the inputs the
            layer sees, or an :class:`~structurednets.calibration.InputStatistics`.
        input_covariance: instead of ``inputs``, their ``(input_dim, input_dim)`` symmetric
            positive semi-definite second moment ``X^T X / n_samples``.
        damping: relative damping of the second moment for the fit (``0.01`` adds 1% of its
            mean eigenvalue); ignored when ``inputs`` is an ``InputStatistics`` (it has its own).
        refinement_iterations: L-BFGS iterations of the calibrated refinement (0: none).
        max_cost_ratio: a bound on the layer's forward plus backward multiply-adds (batch
            256) against ``nn.Linear``'s (:attr:`Approximation.cost_ratio`). Structures whose
            layout search takes the bound (``accepts_max_cost_ratio``) search within it; a
            fitted layer over it is skipped when choosing (``CostTooHighError`` for a single
            structure). ``"best"`` is then the most accurate layer within the bound.
        **options: the structure's own options (only for a single structure).

    Returns:
        The :class:`Approximation` (the most accurate one, for several structures).

    Raises:
        UnknownStructureError: a name is not installed.
        BudgetTooSmallError: a single structure does not fit the share.
        NoStructureFitsError: none of several structures fits the share.
        TypeError, ValueError: a bad ``matrix``, ``bias``, share or option.
    """
    target = as_weight_matrix(matrix)
    nb_params_share = check_share(nb_params_share)
    max_cost_ratio = check_cost_ratio(max_cost_ratio)
    statistics = as_input_statistics(target.shape[1], inputs, input_covariance, damping)
    if isinstance(refinement_iterations, bool) or not isinstance(refinement_iterations, int):
        raise TypeError(
            f"refinement_iterations must be an integer >= 0, got {refinement_iterations!r}"
        )
    if refinement_iterations < 0:
        raise ValueError(
            f"refinement_iterations must be an integer >= 0, got {refinement_iterations}"
        )
    names, choose = structure_names(structure)
    if choose and options:
        raise TypeError(
            f"options {sorted(options)} apply to a single structure; to pass options while "
            "choosing among several, use structure_options={'name': {'option': value}}"
        )
    structure_options = dict(structure_options or {})
    for key in structure_options:
        if not isinstance(structure_options[key], Mapping):
            raise TypeError(
                f"structure_options[{key!r}] must be a dict of options, "
                f"got {structure_options[key]!r}"
            )
    per_structure = {
        get_structure(key).name: dict(value) for key, value in structure_options.items()
    }
    if not choose:
        per_structure[names[0]] = {**per_structure.get(names[0], {}), **options}
    if bias is not None:
        bias = as_vector("bias", bias, target.shape[0])
    layer_dtype = torch.get_default_dtype() if dtype is None else dtype
    if not (isinstance(layer_dtype, torch.dtype) and layer_dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    say = progress or (lambda line: None)
    # Choosing with calibration, every structure is refined a little and the chosen one the
    # rest of the way: the refinement is most of a calibrated fit's time.
    screening = refinement_iterations
    if choose and statistics is not None and len(names) > 1:
        screening = min(refinement_iterations, SCREENING_ITERATIONS)

    tried: list[Approximation | SkippedStructure] = []
    for name in names:
        try:
            result = _fit(
                name,
                target,
                nb_params_share,
                bias,
                layer_dtype,
                device,
                per_structure.get(name, {}),
                statistics,
                screening,
                max_cost_ratio,
            )
        except BudgetTooSmallError as error:
            if not choose:
                raise
            tried.append(SkippedStructure(name, nb_params_share, str(error), error.min_share))
            say(f"{name}: skipped, {error}")
            continue
        except (ValueError, RuntimeError, ArithmeticError) as error:
            # One structure failing on this matrix must not hide the others' results.
            if not choose:
                raise
            reason = f"failed: {type(error).__name__}: {error}"
            tried.append(SkippedStructure(name, nb_params_share, reason))
            say(f"{name}: {reason}")
            continue
        tried.append(result)
        output = ""
        if result.output_relative_error is not None:
            output = f", output error {result.output_relative_error:.4g}"
        say(f"{name}: relative error {result.relative_error:.4g}{output}, {result.seconds:.3g} s")

    fitted = [each for each in tried if isinstance(each, Approximation)]
    if not fitted:
        raise NoStructureFitsError(_nothing_fits_message(target, nb_params_share, tried), tried)
    best = min(fitted, key=lambda each: (each.score, each.nb_parameters))
    if screening < refinement_iterations:
        index = next(i for i, each in enumerate(tried) if each is best)
        best = _refined_further(best, target, statistics, refinement_iterations - screening)
        tried[index] = best
        say(f"{best.structure} chosen, refined: output error {best.output_relative_error:.4g}")
    return dataclasses.replace(best, tried=tuple(tried))


def _nothing_fits_message(
    target: torch.Tensor, nb_params_share: float, skipped: Sequence[SkippedStructure]
) -> str:
    output_dim, input_dim = target.shape
    message = (
        f"no structure fits a {output_dim} x {input_dim} matrix at nb_params_share="
        f"{nb_params_share:g}: " + "; ".join(f"{s.structure}: {s.reason}" for s in skipped)
    )
    shares = [s.min_share for s in skipped if s.min_share is not None and s.min_share <= 1]
    if shares:
        message += f". The smallest share that works for one of them is {min(shares):g}"
    return message
