"""The structure options of an SSS layer: their checks, and the count of the layer they build.

``nb_stages`` (alias ``nb_states``), ``state_dim`` and ``anticausal_state_dim`` ask for a
shape that the layer completes (even blocks, capped state dimensions); the four
:data:`EXACT_OPTIONS` give the exact sizes of a layout. The layer, the fit and the registered
:func:`sss_nb_weight_parameters` check their options here, so their messages agree.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from structurednets.plugin import check_positive_int
from structurednets_sss.layout import SSSSizes, sizes_from_options

__all__ = [
    "EXACT_OPTIONS",
    "StageOptions",
    "check_options",
    "sss_nb_weight_parameters",
]


def check_nb_stages(name: str, value: object, input_dim: int, output_dim: int) -> int:
    """Check the number of stages (option ``name``): 1 <= K <= min(input_dim, output_dim)."""
    nb_stages = check_positive_int(name, value)
    most = min(input_dim, output_dim)
    if nb_stages > most:
        raise ValueError(
            f"{name} must be at most min(input_dim, output_dim) = {most} (every stage has "
            f"at least one input and one output), got {nb_stages}"
        )
    return nb_stages


def _stages_option(nb_stages: object, nb_states: object) -> tuple[str, object]:
    """The number-of-stages option given (``nb_stages``, or its alias ``nb_states``)."""
    if nb_states is None:
        return "nb_stages", nb_stages
    if nb_stages is not None and nb_stages != nb_states:
        raise ValueError(
            "nb_states is another name for nb_stages (the number of stages K); give one of "
            f"them, or both equal, got nb_stages={nb_stages!r} and nb_states={nb_states!r}"
        )
    return "nb_states", nb_states


def check_state_dims(name: str, value: object, nb_stages: int | None) -> int | tuple[int, ...]:
    """Check a state-dimension option: an integer >= 0, or one such integer per boundary
    (``nb_stages - 1`` values)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        return int(value)
    dims = _int_sequence(
        name,
        value,
        0,
        "an integer >= 0 or a sequence of nb_stages - 1 such integers (one per boundary "
        "between stages)",
    )
    if nb_stages is not None and len(dims) != nb_stages - 1:
        raise ValueError(
            f"{name} must have nb_stages - 1 = {nb_stages - 1} entries (one per boundary "
            f"between stages), got {len(dims)}"
        )
    return dims


def _int_sequence(name: str, value: object, least: int, what: str) -> tuple[int, ...]:
    """``value`` as a tuple of integers >= ``least``; ``what`` says what was expected."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, numbers.Integral) or entry < least:
            raise TypeError(f"{name} must hold integers >= {least}, got {list(value)!r}")
    return tuple(int(entry) for entry in value)


#: The options that give a layer's exact sizes (its layout); they go together.
EXACT_OPTIONS = ("input_sizes", "output_sizes", "causal_dims", "anticausal_dims")


def check_exact_sizes(
    input_dim: int,
    output_dim: int,
    input_sizes: object,
    output_sizes: object,
    causal_dims: object,
    anticausal_dims: object,
) -> SSSSizes | None:
    """The exact sizes given by the four :data:`EXACT_OPTIONS`, or ``None`` if none is given.

    Block sizes are positive and sum to the dimensions; the state dimensions (``K - 1`` each,
    ``>= 0``) are used as given, not capped: a fit or a system may realise a state larger than
    its caps, and its layout must rebuild that shape.
    """
    values = (input_sizes, output_sizes, causal_dims, anticausal_dims)
    given = dict(zip(EXACT_OPTIONS, values, strict=True))
    missing = [name for name, value in given.items() if value is None]
    if len(missing) == len(EXACT_OPTIONS):
        return None
    if missing:
        raise ValueError(
            "input_sizes, output_sizes, causal_dims and anticausal_dims give a layer's exact "
            f"sizes (its layout) and go together; missing: {', '.join(missing)}"
        )
    blocks = {}
    for name, total, dim_name in (
        ("input_sizes", input_dim, "input_dim"),
        ("output_sizes", output_dim, "output_dim"),
    ):
        sizes = _int_sequence(name, given[name], 1, "a sequence of one block size per stage")
        if not sizes or sum(sizes) != total:
            raise ValueError(
                f"{name} must be one block size per stage summing to {dim_name} = {total}, "
                f"got {list(sizes)} (sum {sum(sizes)})"
            )
        blocks[name] = sizes
    K = len(blocks["input_sizes"])
    if len(blocks["output_sizes"]) != K:
        raise ValueError(
            f"output_sizes must have as many stages as input_sizes ({K}), "
            f"got {len(blocks['output_sizes'])}"
        )
    dims = {}
    for name in ("causal_dims", "anticausal_dims"):
        dims[name] = _int_sequence(
            name, given[name], 0, "a sequence of one state dimension per boundary between stages"
        )
        if len(dims[name]) != K - 1:
            raise ValueError(
                f"{name} must have K - 1 = {K - 1} entries (one per boundary between the "
                f"{K} stages of input_sizes), got {len(dims[name])}"
            )
    return SSSSizes(
        blocks["input_sizes"], blocks["output_sizes"], dims["causal_dims"], dims["anticausal_dims"]
    )


@dataclass(frozen=True)
class StageOptions:
    """The structure options of a layer, checked; ``None`` where the layer chooses.

    ``exact`` holds the sizes given by the :data:`EXACT_OPTIONS` (then the others are ``None``).
    """

    nb_stages: int | None
    causal_dims: int | tuple[int, ...] | None
    anticausal_dims: int | tuple[int, ...] | None
    exact: SSSSizes | None = None


def check_options(
    input_dim: int,
    output_dim: int,
    *,
    nb_stages: object = None,
    nb_states: object = None,
    state_dim: object = None,
    anticausal_state_dim: object = None,
    input_sizes: object = None,
    output_sizes: object = None,
    causal_dims: object = None,
    anticausal_dims: object = None,
) -> StageOptions:
    """Check the structure options (see :class:`~structurednets_sss.SSSLayer`) against each
    other."""
    exact = check_exact_sizes(
        input_dim, output_dim, input_sizes, output_sizes, causal_dims, anticausal_dims
    )
    stages_name, stages = _stages_option(nb_stages, nb_states)
    if exact is not None:
        others = [
            name
            for name, value in (
                (stages_name, stages),
                ("state_dim", state_dim),
                ("anticausal_state_dim", anticausal_state_dim),
            )
            if value is not None
        ]
        if others:
            raise ValueError(
                "input_sizes, output_sizes, causal_dims and anticausal_dims fix the stages and "
                f"state dimensions; do not pass {', '.join(others)} with them"
            )
        return StageOptions(None, None, None, exact)
    K = None if stages is None else check_nb_stages(stages_name, stages, input_dim, output_dim)
    causal = None if state_dim is None else check_state_dims("state_dim", state_dim, K)
    if K is None and isinstance(causal, tuple):
        K = _stages_from_dims("state_dim", causal, input_dim, output_dim)
    anticausal = (
        None
        if anticausal_state_dim is None
        else check_state_dims("anticausal_state_dim", anticausal_state_dim, K)
    )
    if K is None and isinstance(anticausal, tuple):
        K = _stages_from_dims("anticausal_state_dim", anticausal, input_dim, output_dim)
    return StageOptions(K, causal, anticausal)


def _stages_from_dims(name: str, dims: tuple[int, ...], input_dim: int, output_dim: int) -> int:
    """The number of stages a per-boundary sequence of state dimensions implies."""
    most = min(input_dim, output_dim)
    if len(dims) + 1 > most:
        raise ValueError(
            f"{name} has {len(dims)} entries (one per boundary between stages), which makes "
            f"{len(dims) + 1} stages, but there can be at most min(input_dim, output_dim) = {most}"
        )
    return len(dims) + 1


def sss_nb_weight_parameters(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    system: object = None,
    max_cost_ratio: object = None,
    **options: object,
) -> int:
    """Weight scalars of an :class:`~structurednets_sss.SSSLayer` built with these arguments
    (random start, or the exact sizes of a layout), computed without building it.

    The options are the layer's: ``nb_stages`` (alias ``nb_states``), ``state_dim``,
    ``anticausal_state_dim``, the exact sizes ``input_sizes``, ``output_sizes``,
    ``causal_dims``, ``anticausal_dims``, or ``system``; ``max_cost_ratio`` (a fit control)
    is ignored.
    """
    if system is not None:
        from structurednets_sss.system import SSSSystem, check_system_fits

        if not isinstance(system, SSSSystem):
            raise TypeError(f"system must be an SSSSystem, got {type(system).__name__}")
        return check_system_fits(
            system, input_dim, output_dim, nb_params_share
        ).nb_weight_parameters
    checked = check_options(input_dim, output_dim, **options)
    return sizes_from_options(input_dim, output_dim, nb_params_share, checked).nb_weight_parameters
