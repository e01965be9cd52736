"""Kernels of the LDR matrix ``W = sum_(k<m) A^k G H^T B^k`` and of its product with a batch.

With ``k = J b + l`` and the chain starts ``S_A``, ``S_B`` of :mod:`structurednets_ldr.krylov`,

    ``W = sum_(l<b) A^l W_0 B^l``,  ``W_0 = S_A S_B^T``  (rank ``M r``, ``M = ceil(m / b)``),

evaluated by Horner's rule, ``H_(b-1) = W_0``, ``H_l = W_0 + A H_(l+1) B``: ``b - 1`` steps of
two three-band stencils, never a Krylov matrix. Two forms:

- explicit: build ``W`` (one ``out x M r x in`` product and ``b - 1`` Horner steps on
  ``out x in``), then ``U W^T``; cheapest when the batch is large;
- factored: ``U W^T = (sum_l A^l S_A S_B^T B^l U^T)^T``: ``V_l = B^l U^T`` by stencils,
  ``Z = S_B^T [V_0 ... V_(b-1)]`` and ``S_A Z`` in two products, then Horner with ``A``
  on ``out x batch`` blocks; cheapest for small batches.

Every function here is a plain function of tensors, without autograd: the backward functions
are the hand-written adjoints (Horner's adjoint, band gradients as banded dot products, then
:func:`~structurednets_ldr.krylov.chain_starts_backward` and
:func:`~structurednets_ldr.krylov.power_chunks_backward`). :mod:`structurednets_ldr.ops`
wraps them into ``torch.library`` custom operators with autograd and shape functions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from structurednets_ldr import compiled
from structurednets_ldr.krylov import (
    ChainPlan,
    chain_starts_backward,
    coarse_state,
    combined_coefficients,
    combined_coefficients_backward,
    default_chunk_size,
    make_chain_plan,
    power_chunks,
    power_chunks_backward,
    power_steps,
)
from structurednets_ldr.scratch import scratch

__all__ = [
    "LDRPlan",
    "chain_plan",
    "choose_plan",
    "explicit_backward",
    "explicit_forward",
    "factored_backward",
    "factored_forward",
    "make_plan",
    "plan_table",
]


# -- three-band stencils and banded dot products -------------------------------------------


def _row_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The views ``[1:]``, ``[:1]``, ``[:-1]``, ``[-1:]`` along the first dimension, which a
    periodic three-band stencil on rows reads and writes (made once per buffer, since every
    slicing is an operation of its own)."""
    return tensor[1:], tensor[:1], tensor[:-1], tensor[-1:]


def _column_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`_row_parts` along the second dimension."""
    return tensor[:, 1:], tensor[:, :1], tensor[:, :-1], tensor[:, -1:]


def _coefficient_parts(bands: torch.Tensor, rows: bool) -> tuple[torch.Tensor, ...]:
    """``(centre, minus[1:], minus[:1], plus[:-1], plus[-1:])`` of periodic three-band
    ``bands`` ``(3, n)``, as columns (for :func:`_row_parts`) or as rows."""
    minus, centre, plus = (band.unsqueeze(1) for band in bands) if rows else bands
    return centre, minus[1:], minus[:1], plus[:-1], plus[-1:]


def _transposed_parts(bands: torch.Tensor, rows: bool = False) -> tuple[torch.Tensor, ...]:
    """:func:`_coefficient_parts` of the transpose of ``bands``, without forming its bands
    (``transpose_bands`` is two rolls and a stack)."""
    # the transpose's minus band is plus rolled, and so on
    minus, centre, plus = (band.unsqueeze(1) for band in bands) if rows else bands
    return centre, plus[:-1], plus[-1:], minus[1:], minus[:1]


def _stencil(coefficients, source, source_parts, target, target_parts, base=None) -> None:
    """``target = base + stencil(source)`` with the parts made by :func:`_coefficient_parts`
    and :func:`_row_parts` (rows) or :func:`_column_parts` (columns): five operations."""
    centre, minus_tail, minus_head, plus_init, plus_last = coefficients
    source_tail, source_head, source_init, source_last = source_parts
    target_tail, target_head, target_init, target_last = target_parts
    if base is None:
        torch.mul(source, centre, out=target)
    else:
        torch.addcmul(base, source, centre, out=target)
    target_tail.addcmul_(source_init, minus_tail)
    target_head.addcmul_(source_last, minus_head)
    target_init.addcmul_(source_tail, plus_init)
    target_last.addcmul_(source_head, plus_last)


def _stencil_rows(coefficients, source, target, base=None) -> None:
    """:func:`_stencil` on rows, for buffers whose slices are not reused."""
    _stencil(coefficients, source, _row_parts(source), target, _row_parts(target), base)


@functools.lru_cache(maxsize=64)
def _boundary_indices(n: int, covered: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Rows of :func:`_band_dots` outside the chunked interior and their three neighbours."""
    rows = torch.tensor(sorted({0, n - 1, *range(1 + covered, n - 1)}))
    neighbours = (rows[:, None] + torch.tensor([-1, 0, 1])) % n
    return rows.to(device), neighbours.reshape(-1).to(device)


def _band_dots(left: torch.Tensor, right: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """``out[o + 1, p] = <left[p], right[(p + o) % n]>`` for ``o = -1, 0, 1``: ``(3, n)``.

    The gradient of a periodic three-band matrix ``M`` in ``Y = M R`` is ``band_dots(dY, R)``.
    Interior rows go in chunks of ``chunk`` rows through one batched product (each chunk
    against its rows and one more on each side), so each input is read about once.
    """
    n, C = left.shape
    out = left.new_zeros(3, n)
    size = min(chunk, n - 2)
    nb_chunks = (n - 2) // size if size > 0 else 0
    if nb_chunks:
        (ls0, ls1), (rs0, rs1) = left.stride(), right.stride()
        chunks_left = left.as_strided(
            (nb_chunks, size, C), (size * ls0, ls0, ls1), left.storage_offset() + ls0
        )
        chunks_right = right.as_strided(
            (nb_chunks, size + 2, C), (size * rs0, rs0, rs1), right.storage_offset()
        )
        products = torch.bmm(chunks_left, chunks_right.transpose(1, 2))
        for band in range(3):
            diagonal = torch.diagonal(products, offset=band, dim1=1, dim2=2)
            out[band, 1 : 1 + nb_chunks * size] = diagonal.reshape(-1)
    rows, neighbours = _boundary_indices(n, nb_chunks * size, left.device)
    boundary_left = left.index_select(0, rows)
    boundary_right = right.index_select(0, neighbours).view(len(rows), 3, C)
    out[:, rows] = torch.einsum("kc,kbc->bk", boundary_left, boundary_right)
    return out


# -- plans ---------------------------------------------------------------------------------

# Rough single-thread costs (seconds) of one multiply-add in a large matrix product, of one
# element of an elementwise operation, of one operation whatever its size (dispatch), and
# of one coarse step per row and generator; they only steer the choice of form and chain
# length.
_MULTIPLY_ADD = 2e-11
_ELEMENT = 3e-10
_OPERATION = 5e-6
_COARSE_STEP = 10e-6
_COARSE_ROW = 4e-9


@dataclass(frozen=True)
class LDRPlan:
    """How to evaluate one LDR product: the form and the chain length.

    Attributes:
        explicit: build ``W`` (``True``) or apply the factored form (``False``).
        chain: the :class:`~structurednets_ldr.krylov.ChainPlan` of ``diag(A, B^T)``.
    """

    explicit: bool
    chain: ChainPlan

    @property
    def output_dim(self) -> int:
        return self.chain.block_sizes[0]

    @property
    def input_dim(self) -> int:
        return self.chain.block_sizes[1]


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
        return compiled.weight_seconds(out_dim, in_dim, m, r) + product + 1e-3 * seconds
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


def choose_plan(
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
def plan_table(
    out_dim: int, in_dim: int, nb_columns: int, nb_generators: int, training: bool = True
) -> tuple[tuple[int | None, bool, int], ...]:
    """:func:`choose_plan` for every batch size at once: ``((below, explicit, b), ...)``.

    Entry ``i`` applies to batch sizes below ``below`` (and at least the previous entry's);
    the last has ``below=None``. Each form and chain length costs ``c_0 + c_1 batch``, so the
    best plan changes at a few batch sizes only: a layer looks its plan up with comparisons,
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


@functools.lru_cache(maxsize=256)
def chain_plan(
    out_dim: int, in_dim: int, nb_columns: int, chain_length: int, rank: int = 1
) -> ChainPlan:
    """The :class:`~structurednets_ldr.krylov.ChainPlan` of ``diag(A, B^T)`` for ``rank``
    generators (cached: it keeps the plan's index tensors per device)."""
    return make_chain_plan((out_dim, in_dim), nb_columns, chain_length, rank=rank)


def make_plan(
    out_dim: int, in_dim: int, nb_columns: int, explicit: bool, chain_length: int
) -> LDRPlan:
    """An :class:`LDRPlan` for ``out x in`` matrices with ``nb_columns`` Krylov columns."""
    return LDRPlan(explicit, chain_plan(out_dim, in_dim, nb_columns, chain_length))


# -- shared pieces -------------------------------------------------------------------------


def _split_starts(starts: torch.Tensor, chain: ChainPlan):
    """``S_A`` ``(out, M r)`` and ``S_B`` ``(in, M r)`` from the chain starts, contiguous
    (scratch)."""
    flat = starts.view(-1, starts.shape[2])
    columns = flat.shape[0]
    out_dim, in_dim = chain.block_sizes
    S_A = scratch("S_A", (out_dim, columns), starts).copy_(flat[:, chain.rows(0)].T)
    S_B = scratch("S_B", (in_dim, columns), starts).copy_(flat[:, chain.rows(1)].T)
    return S_A, S_B


def _start_gradients(starts: torch.Tensor, chain: ChainPlan):
    """A zero gradient of the chain starts (scratch) and its views ``dS_A^T`` ``(M r, out)``
    and ``dS_B^T`` ``(M r, in)``, for products to write into."""
    gradient = scratch("starts_gradient", tuple(starts.shape), starts).zero_()
    flat = gradient.view(-1, starts.shape[2])
    return gradient, flat[:, chain.rows(0)], flat[:, chain.rows(1)]


def _cut(chain: ChainPlan, r: int) -> int | None:
    """Columns of the chain starts whose chains are complete, if the last one is cut."""
    if chain.last_chain_length == chain.chain_length:
        return None
    return (chain.nb_chains - 1) * r


def _starts(A_bands, B_bands, G, H, chain: ChainPlan, keep: bool):
    """``(starts, S_A, S_B)``: the chain starts ``(M, r, rows)`` if ``keep`` (fresh, saved
    for backward; else empty), and ``S_A`` ``(out, M r)``, ``S_B`` ``(in, M r)``
    (contiguous, scratch)."""
    P = power_chunks(combined_coefficients(A_bands, B_bands), chain)
    state = coarse_state(P, torch.cat((G, H)), chain)
    M, chunks, r, q = state.shape
    S = scratch("S", (chunks * q, M * r), G)
    S.view(chunks, q, M, r).copy_(state.permute(1, 3, 0, 2))
    starts = G.new_empty(0)
    if keep:
        starts = G.new_empty(M, r, chunks * q)
        starts.view(M, r, chunks, q).copy_(state.transpose(1, 2))
    return starts, S[chain.rows(0)], S[chain.rows(1)]


def _starts_backward(A_bands, B_bands, starts, gradient, chain: ChainPlan):
    """Gradients of ``A_bands``, ``B_bands``, ``G``, ``H`` through the chain starts.

    ``gradient`` ``(M, r, rows)`` is overwritten.
    """
    out_dim = chain.block_sizes[0]
    if chain.nb_chains == 1:
        _, dX = chain_starts_backward(None, starts, gradient, chain)
        dA, dB = torch.zeros_like(A_bands), torch.zeros_like(B_bands)
    else:
        coefficients = combined_coefficients(A_bands, B_bands)
        powers = power_steps(coefficients, chain)
        P = powers[-1, ..., 1:-1].transpose(1, 2).contiguous()
        dP, dX = chain_starts_backward(P, starts, gradient, chain)
        dA, dB = combined_coefficients_backward(
            power_chunks_backward(coefficients, powers, dP, chain), out_dim
        )
    contiguous = torch.contiguous_format
    return (
        dA,
        dB,
        dX[:out_dim].clone(memory_format=contiguous),
        dX[out_dim:].clone(memory_format=contiguous),
    )


# -- explicit form -------------------------------------------------------------------------


def _first_term(S_A, S_B, chain: ChainPlan, W0: torch.Tensor) -> torch.Tensor:
    """``W_0 = S_A S_B^T`` into ``W0``; returns ``W_0`` without the cut last chain's starts
    (the Horner steps past the end of that chain add only the complete chains), which is
    ``W0`` itself when no chain is cut."""
    cut = _cut(chain, S_A.shape[1] // chain.nb_chains)
    if cut is None:
        return torch.mm(S_A, S_B.T, out=W0)
    W0_cut = torch.mm(S_A[:, :cut], S_B[:, :cut].T, out=scratch("W0_cut", W0.shape, W0))
    torch.addmm(W0_cut, S_A[:, cut:], S_B[:, cut:].T, out=W0)
    return W0_cut


def _horner(A_bands, B_bands, W0, W0_cut, chain: ChainPlan, slots, W=None) -> None:
    """Horner's rule ``H_(b-1) = W_0``, ``H_l = W_0 + A H_(l+1) B`` (``W_0`` without the cut
    chain past its end): ``H_(l+1)`` goes to ``slots[l]`` (``(out, in)`` views, ``l < b - 1``;
    the same tensor may serve several) and ``H_0 = W`` to ``W``, or stops at ``H_1`` when
    ``W`` is ``None``."""
    b, last = chain.chain_length, chain.last_chain_length
    X = scratch("A_H", W0.shape, W0)
    rows, columns = {}, {}  # the slices of every buffer, made once

    def parts(tensor, made, make):
        key = (tensor.data_ptr(), tensor.stride())
        if key not in made:
            made[key] = make(tensor)
        return made[key]

    A_parts = _coefficient_parts(A_bands, rows=True)
    B_parts = _transposed_parts(B_bands)
    X_rows, X_columns = _row_parts(X), _column_parts(X)
    slots[b - 2].copy_(W0 if b - 1 < last else W0_cut)
    for step in range(b - 2, 0 if W is None else -1, -1):
        source = slots[step]
        _stencil(A_parts, source, parts(source, rows, _row_parts), X, X_rows)
        target = slots[step - 1] if step > 0 else W
        base = W0 if step < last else W0_cut
        _stencil(B_parts, X, X_columns, target, parts(target, columns, _column_parts), base)


def explicit_forward(A_bands, B_bands, G, H, chain: ChainPlan, keep: bool):
    """``(W, starts, W0)``: ``W`` ``(out, in)``; with ``keep``, what the backward pass needs:
    the chain starts and ``W_0 = S_A S_B^T`` ``(out, in)``; else both are empty."""
    out_dim, in_dim = chain.block_sizes
    b = chain.chain_length
    starts, S_A, S_B = _starts(A_bands, B_bands, G, H, chain, keep)
    if b == 1:
        W = S_A @ S_B.T
        return W, starts, G.new_empty(0)
    shape = (out_dim, in_dim)
    W0 = G.new_empty(shape) if keep else scratch("W0", shape, G)
    W0_cut = _first_term(S_A, S_B, chain, W0)
    pair = scratch("horner", (2, *shape), G)  # H_(l+1) in turn
    W = G.new_empty(shape)
    slots = pair.unbind(0) * (b // 2)
    _horner(A_bands, B_bands, W0, W0_cut, chain, slots, W)
    if not keep:
        return W, G.new_empty(0), G.new_empty(0)
    return W, starts, W0


def explicit_backward(dW, A_bands, B_bands, starts, W0, chain: ChainPlan):
    """Gradients ``(dA_bands, dB_bands, dG, dH)`` of :func:`explicit_forward`'s ``W``.

    Recomputes the Horner matrices ``H_1 .. H_(b-1)`` from ``W_0`` (``b - 2`` steps)
    rather than keeping them from the forward pass: ``b - 1`` matrices per layer would
    stay alive in the autograd graph, and allocating them fresh in every forward pass
    costs page faults.
    """
    out_dim, in_dim = chain.block_sizes
    b, last, r = chain.chain_length, chain.last_chain_length, starts.shape[1]
    S_A, S_B = _split_starts(starts, chain)
    dA = A_bands.new_zeros(3, out_dim)
    dB = B_bands.new_zeros(3, in_dim)
    shape = (out_dim, in_dim)
    dH = scratch("dH", shape, dW).copy_(dW)
    D_all = scratch("D_all", shape, dW).copy_(dW)
    D_early = scratch("D_early", shape, dW).copy_(dW) if last < b else None
    if b > 1:
        cut = _cut(chain, r)
        W0_cut = W0
        if cut is not None:
            W0_cut = torch.addmm(
                W0,
                S_A[:, cut:],
                S_B[:, cut:].T,
                alpha=-1.0,
                out=scratch("W0_cut", shape, W0),
            )
        horner = scratch("horner", (out_dim, b - 1, in_dim), W0)
        _horner(A_bands, B_bands, W0, W0_cut, chain, horner.unbind(1))
        X_step = scratch("A_H", shape, dW)
        dX = scratch("dX", shape, dW)
        # coefficients and slices made once (every slicing is an operation of its own)
        A_rows, A_T_rows = _coefficient_parts(A_bands, True), _transposed_parts(A_bands, True)
        B_columns = _coefficient_parts(B_bands, rows=False)  # dX = dH B^T
        X_rows, dX_rows, dX_columns = _row_parts(X_step), _row_parts(dX), _column_parts(dX)
        dH_rows, dH_columns = _row_parts(dH), _column_parts(dH)
        for step, H_next in enumerate(horner.unbind(1)):
            # H_l = W0 + X_l B and X_l = A H_(l+1)
            _stencil(A_rows, H_next, _row_parts(H_next), X_step, X_rows)
            dB += _band_dots(X_step.T, dH.T)
            _stencil(B_columns, dH, dH_columns, dX, dX_columns)
            dA += _band_dots(dX, H_next)
            _stencil(A_T_rows, dX, dX_rows, dH, dH_rows)
            D_all += dH
            if D_early is not None and step + 1 < last:
                D_early += dH
    # dS_A = D S_B and dS_B = D^T S_A, with D_early for the starts of the cut chain
    gradient, dS_A_T, dS_B_T = _start_gradients(starts, chain)
    cut = _cut(chain, r)
    complete = slice(None) if cut is None else slice(None, cut)
    torch.mm(S_B[:, complete].T, D_all.T, out=dS_A_T[complete])
    torch.mm(S_A[:, complete].T, D_all, out=dS_B_T[complete])
    if cut is not None:
        torch.mm(S_B[:, cut:].T, D_early.T, out=dS_A_T[cut:])
        torch.mm(S_A[:, cut:].T, D_early, out=dS_B_T[cut:])
    dA_starts, dB_starts, dG, dH_generators = _starts_backward(
        A_bands, B_bands, starts, gradient, chain
    )
    return dA + dA_starts, dB + dB_starts, dG, dH_generators


# -- factored form -------------------------------------------------------------------------


def factored_forward(U, A_bands, B_bands, G, H, chain: ChainPlan, keep: bool):
    """``(Y, starts, V, Z, Q)``: ``Y = U W^T`` ``(batch, out)``; with ``keep``, the chain
    starts and ``V_l = B^l U^T`` ``(in, b, batch)``, ``Z = S_B^T V`` ``(M r, b, batch)``,
    ``Q_l = S_A Z_l + A Q_(l+1)`` ``(out, b, batch)`` for the backward pass; else empty."""
    out_dim, in_dim = chain.block_sizes
    b, last, batch = chain.chain_length, chain.last_chain_length, U.shape[0]
    starts, S_A, S_B = _starts(A_bands, B_bands, G, H, chain, keep)
    columns = S_A.shape[1]

    def new(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return U.new_empty(shape) if keep else scratch(name, shape, U)

    V = new("V", (in_dim, b, batch))
    V[:, 0].copy_(U.T)
    B_rows = _coefficient_parts(B_bands, rows=True)
    for step in range(1, b):
        _stencil_rows(B_rows, V[:, step - 1], V[:, step])
    Z = new("Z", (columns, b, batch))
    torch.mm(S_B.T, V.view(in_dim, b * batch), out=Z.view(columns, b * batch))
    cut = _cut(chain, columns // chain.nb_chains)
    if cut is not None:
        Z[cut:, last:] = 0.0
    Q = new("Q", (out_dim, b, batch))
    torch.mm(S_A, Z.view(columns, b * batch), out=Q.view(out_dim, b * batch))
    A_rows = _coefficient_parts(A_bands, rows=True)
    for step in range(b - 2, -1, -1):
        _stencil_rows(A_rows, Q[:, step + 1], Q[:, step], base=Q[:, step])
    Y = Q[:, 0].T.clone(memory_format=torch.contiguous_format)  # never a view of Q
    if not keep:
        return Y, *(U.new_empty(0) for _ in range(4))
    return Y, starts, V, Z, Q


def factored_backward(dY, U, A_bands, B_bands, starts, V, Z, Q, chain: ChainPlan, input_grad):
    """Gradients ``(dU, dA_bands, dB_bands, dG, dH)`` of :func:`factored_forward`'s ``Y``;
    ``dU`` is empty unless ``input_grad``."""
    out_dim, in_dim = chain.block_sizes
    b, last, batch, r = chain.chain_length, chain.last_chain_length, U.shape[0], starts.shape[1]
    S_A, S_B = _split_starts(starts, chain)
    columns = S_A.shape[1]
    dQ = scratch("dQ", (out_dim, b, batch), dY)
    dQ[:, 0].copy_(dY.T)
    A_T_rows = _transposed_parts(A_bands, rows=True)
    for step in range(b - 1):
        _stencil_rows(A_T_rows, dQ[:, step], dQ[:, step + 1])
    dA = _band_dots(dQ[:, : b - 1].reshape(out_dim, -1), Q[:, 1:].reshape(out_dim, -1))
    dQ_flat = dQ.view(out_dim, b * batch)
    gradient, dS_A_T, dS_B_T = _start_gradients(starts, chain)
    torch.mm(Z.view(columns, b * batch), dQ_flat.T, out=dS_A_T)
    dZ = scratch("dZ", (columns, b, batch), dY)
    torch.mm(S_A.T, dQ_flat, out=dZ.view(columns, b * batch))
    cut = _cut(chain, r)
    if cut is not None:
        dZ[cut:, last:] = 0.0
    torch.mm(dZ.view(columns, b * batch), V.view(in_dim, b * batch).T, out=dS_B_T)
    dV = scratch("dV", (in_dim, b, batch), dY)
    torch.mm(S_B, dZ.view(columns, b * batch), out=dV.view(in_dim, b * batch))
    B_T_rows = _transposed_parts(B_bands, rows=True)
    for step in range(b - 2, -1, -1):
        _stencil_rows(B_T_rows, dV[:, step + 1], dV[:, step], base=dV[:, step])
    dB = _band_dots(dV[:, 1:].reshape(in_dim, -1), V[:, : b - 1].reshape(in_dim, -1))
    dU = dV[:, 0].T.clone(memory_format=torch.contiguous_format) if input_grad else U.new_empty(0)
    dA_starts, dB_starts, dG, dH = _starts_backward(A_bands, B_bands, starts, gradient, chain)
    return dU, dA + dA_starts, dB + dB_starts, dG, dH
