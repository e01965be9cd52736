"""The cost model of the LDR kernels: which form and chain length evaluate a product fastest.

An LDR product is evaluated with the explicit ``W`` or in factored form, with chains of
``b`` Krylov columns (:mod:`structurednets_ldr.kernels`); a *schedule* is such a choice,
``(explicit, chain_length)``. It depends on the shapes and the batch size only, so a layer
computes its tables once (:func:`schedule_table`: the best schedule changes at a few batch
sizes). The estimates are seconds on one thread, fitted to timings; they only rank the
choices. The compiled inference kernels (numba, :mod:`structurednets_ldr.kernels.compiled`)
have their own estimate and chain length, here too (:func:`compiled_chain_length`).
"""

from __future__ import annotations

import functools
import math

from structurednets_ldr.kernels import compiled
from structurednets_ldr.kernels.krylov import default_chunk_size

__all__ = [
    "choose_schedule",
    "compiled_chain_length",
    "compiled_weight_seconds",
    "schedule_for",
    "schedule_table",
]

# -- the torch kernels ---------------------------------------------------------------------

# Rough single-thread costs (seconds) of one multiply-add in a large matrix product, of one
# element of an elementwise operation, of one operation whatever its size (dispatch), and
# of one coarse step per row and generator; they only steer the choice of form and chain
# length.
_MULTIPLY_ADD = 2e-11
_ELEMENT = 3e-10
_OPERATION = 5e-6
_COARSE_STEP = 10e-6
_COARSE_ROW = 4e-9


def _estimate(explicit: bool, out_dim, in_dim, m, r, batch, b, training=True) -> float:
    """Estimated seconds of one product (``training``: forward and backward)."""
    M = math.ceil(m / b)
    if not training:
        return _estimate_forward(explicit, out_dim, in_dim, m, r, batch, b, M)
    coarse = 2 * (M - 1) * (_COARSE_STEP + _COARSE_ROW * (out_dim + in_dim) * r)
    powers = 40 * b * b * (out_dim + in_dim) * _ELEMENT if M > 1 else 0.0
    # Operations issued per Horner step (forward and backward; the explicit form also takes
    # two banded dot products per step) and per step of the recursion that builds P.
    operations = (48 if explicit else 20) * (b - 1) + 18 * b * (M > 1)
    if explicit:
        products = 3 * out_dim * in_dim * (M * r + (batch or 0))
        elements = 18 * (b - 1) * out_dim * in_dim
    else:
        products = 3 * m * r * (out_dim + in_dim) * batch
        elements = 18 * (b - 1) * (out_dim + in_dim) * batch
    return (
        products * _MULTIPLY_ADD + elements * _ELEMENT + operations * _OPERATION + coarse + powers
    )


def _estimate_forward(explicit: bool, out_dim, in_dim, m, r, batch, b, M) -> float:
    """The forward pass alone (no gradient wanted), fitted like :func:`_estimate` to
    single-thread timings at 128 to 1024: longer chains pay off here, since no backward
    pass runs the ``M - 1`` coarse steps and the Horner steps again."""
    q = default_chunk_size(b, max(out_dim, in_dim), r)
    chunks = math.ceil(out_dim / q) + math.ceil(in_dim / q)
    coarse = (M - 1) * (2e-6 + 2e-7 * chunks + 1.5e-9 * (out_dim + in_dim) * r)
    powers = (2.75 * b * b * (out_dim + in_dim) * _ELEMENT + (1.4 * b + 6) * _OPERATION) * (M > 1)
    if explicit:
        products = out_dim * in_dim * (M * r + (batch or 0))
        steps = 2.6 * out_dim * in_dim * _ELEMENT + 3 * _OPERATION
    else:
        products = m * r * (out_dim + in_dim) * batch
        steps = 1.3 * (out_dim + in_dim) * batch * _ELEMENT + 10 * _OPERATION
    seconds = products * _MULTIPLY_ADD + (b - 1) * steps + coarse + powers
    if explicit and compiled.AVAILABLE:
        # On CPU the compiled kernels build W, whatever b; b matters only where the torch
        # kernels run (other devices and dtypes), so their estimate still breaks ties.
        product = out_dim * in_dim * (batch or 0) * _MULTIPLY_ADD
        return compiled_weight_seconds(out_dim, in_dim, m, r) + product + 1e-3 * seconds
    return seconds


def _chain_lengths(nb_columns: int) -> list[int]:
    """The distinct chain lengths ``ceil(m / M)`` for ``M = 1 .. m``."""
    return sorted({math.ceil(nb_columns / M) for M in range(1, nb_columns + 1)})


def _candidates(nb_columns: int, nb_generators: int, training: bool, forms=(True, False)):
    """``(explicit, b)`` pairs to choose from. For training, the explicit form's backward
    pass holds ``b - 1`` matrices ``H_l``: at most ``2 r``, the size of ``K_A`` and ``K_B``."""
    return [
        (form, b)
        for form in forms
        for b in _chain_lengths(nb_columns)
        if not (form and training) or b - 1 <= 2 * nb_generators
    ]


def choose_schedule(
    out_dim: int,
    in_dim: int,
    nb_columns: int,
    nb_generators: int,
    batch: int | None,
    *,
    explicit: bool | None = None,
    chain_length: int | None = None,
    training: bool = True,
) -> tuple[bool, int]:
    """``(explicit, chain_length)`` with the least estimated time for this batch size, for
    forward and backward (``training``) or the forward pass alone.

    ``batch=None`` means building ``W`` alone (``to_dense``), which is always explicit.
    """
    forms = (True,) if batch is None else (True, False) if explicit is None else (explicit,)
    candidates = (
        [(form, chain_length) for form in forms]
        if chain_length
        else _candidates(nb_columns, nb_generators, training, forms)
    )
    best = min(
        (
            _estimate(form, out_dim, in_dim, nb_columns, nb_generators, batch, b, training),
            form,
            b,
        )
        for form, b in candidates
    )
    return best[1], best[2]


@functools.lru_cache(maxsize=256)
def schedule_table(
    out_dim: int, in_dim: int, nb_columns: int, nb_generators: int, training: bool = True
) -> tuple[tuple[int | None, bool, int], ...]:
    """:func:`choose_schedule` for every batch size at once: ``((below, explicit, b), ...)``.

    Entry ``i`` applies to batch sizes below ``below`` (and at least the previous entry's);
    the last has ``below=None``. Each form and chain length costs ``c_0 + c_1 batch``, so the
    best schedule changes at a few batch sizes only: a layer looks its schedule up with comparisons,
    which ``torch.compile`` turns into guards on a dynamic batch size.
    """

    def cost(explicit: bool, b: int, batch: int) -> float:
        return _estimate(explicit, out_dim, in_dim, nb_columns, nb_generators, batch, b, training)

    lines = [
        (cost(form, b, 0), cost(form, b, 1) - cost(form, b, 0), form, b)
        for form, b in _candidates(nb_columns, nb_generators, training)
    ]
    table = []
    batch = 1
    while True:
        at = min(lines, key=lambda line: (line[0] + line[1] * batch, line[2], line[3]))
        # the first batch size from which a line with a smaller slope costs less
        switch = min(
            (
                max(batch + 1, math.floor((line[0] - at[0]) / (at[1] - line[1])) + 1)
                for line in lines
                if line[1] < at[1] * (1 - 1e-9)  # equal slopes up to rounding never cross
            ),
            default=None,
        )
        if table and table[-1][1:] == (at[2], at[3]):
            table[-1] = (switch, at[2], at[3])
        else:
            table.append((switch, at[2], at[3]))
        if switch is None:
            return tuple(table)
        batch = switch


def schedule_for(table: tuple[tuple[int | None, bool, int], ...], batch: int) -> tuple[bool, int]:
    """``(explicit, chain_length)`` of :func:`schedule_table`'s ``table`` for this batch size;
    comparisons only, which ``torch.compile`` turns into guards on a dynamic batch size."""
    for below, explicit, chain_length in table:
        if below is not None and batch < below:
            return explicit, chain_length
    return table[-1][1:]


# -- the compiled inference kernels --------------------------------------------------------

# Single-thread rates of the compiled kernels: multiply-adds per second of the W_0 product
# and of the starts' steps, and matrix entries per second of a Horner step (measured at 64
# to 1024, float32), and the fixed cost of a call.
_PRODUCT_RATE = 5e10
_STEP_RATE = 2.5e10
_HORNER_RATE = 5.5e9
_CALL = 30e-6


@functools.lru_cache(maxsize=256)
def compiled_chain_length(out_dim: int, in_dim: int, nb_columns: int, rank: int) -> int:
    """The chain length ``b`` with the least estimated time of the compiled ``weight``: a
    longer chain means a thinner ``W_0`` product and more Horner steps,
    ``b* ~ sqrt(5.5 m r / 50)``."""
    return min(
        range(1, nb_columns + 1),
        key=lambda b: compiled_weight_seconds(out_dim, in_dim, nb_columns, rank, b),
    )


def compiled_weight_seconds(
    out_dim: int, in_dim: int, nb_columns: int, rank: int, chain: int | None = None
) -> float:
    """Estimated seconds of the compiled ``weight`` (one thread), with chains of ``chain``
    columns (default :func:`compiled_chain_length`)."""
    if chain is None:
        chain = compiled_chain_length(out_dim, in_dim, nb_columns, rank)
    nb_chains = math.ceil(nb_columns / chain)
    steps = 3 * nb_columns * rank * (out_dim + in_dim) / _STEP_RATE
    product = out_dim * in_dim * nb_chains * rank / _PRODUCT_RATE
    horner = (chain - 1) * out_dim * in_dim / _HORNER_RATE
    return _CALL + steps + product + horner
