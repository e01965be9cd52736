"""The two forms of the LDR product ``W = sum_(k<m) A^k G H^T B^k`` and their backward passes.

With ``k = J b + l`` and the chain starts ``S_A``, ``S_B`` of
:mod:`structurednets_ldr.kernels.krylov`,

    ``W = sum_(l<b) A^l W_0 B^l``,  ``W_0 = S_A S_B^T``  (rank ``M r``, ``M = ceil(m / b)``),

evaluated by Horner's rule, ``H_(b-1) = W_0``, ``H_l = W_0 + A H_(l+1) B``: ``b - 1`` steps of
two three-band stencils (:mod:`structurednets_ldr.kernels.stencils`), never a Krylov matrix.
Two forms:

- explicit: build ``W`` (one ``out x M r x in`` product and ``b - 1`` Horner steps on
  ``out x in``), then ``U W^T``; cheapest when the batch is large;
- factored: ``U W^T = (sum_l A^l S_A S_B^T B^l U^T)^T``: ``V_l = B^l U^T`` by stencils,
  ``Z = S_B^T [V_0 ... V_(b-1)]`` and ``S_A Z`` in two products, then Horner with ``A``
  on ``out x batch`` blocks; cheapest for small batches.

Which form and chain length a call uses is the cost model's choice
(:mod:`structurednets_ldr.schedule`). Every function here is a plain function of tensors,
without autograd: the backward functions are the hand-written adjoints (Horner's adjoint,
band gradients as banded dot products, then
:func:`~structurednets_ldr.kernels.krylov.chain_starts_backward` and
:func:`~structurednets_ldr.kernels.krylov.power_chunks_backward`).
:mod:`structurednets_ldr.kernels.ops` wraps them into ``torch.library`` custom operators with
autograd and shape functions.
"""

from __future__ import annotations

import functools

import torch

from structurednets_ldr.kernels.krylov import (
    ChainGeometry,
    chain_starts_backward,
    coarse_state,
    combined_coefficients,
    combined_coefficients_backward,
    make_chain_geometry,
    power_chunks,
    power_chunks_backward,
    power_steps,
)
from structurednets_ldr.kernels.scratch import scratch
from structurednets_ldr.kernels.stencils import (
    band_dots,
    coefficient_parts,
    column_parts,
    row_parts,
    stencil,
    stencil_rows,
    transposed_parts,
)

__all__ = [
    "chain_geometry",
    "explicit_backward",
    "explicit_forward",
    "factored_backward",
    "factored_forward",
]


@functools.lru_cache(maxsize=256)
def chain_geometry(
    out_dim: int, in_dim: int, nb_columns: int, chain_length: int, rank: int = 1
) -> ChainGeometry:
    """The :class:`~structurednets_ldr.kernels.krylov.ChainGeometry` of ``diag(A, B^T)`` for
    ``rank`` generators (cached: it keeps its index tensors per device)."""
    return make_chain_geometry((out_dim, in_dim), nb_columns, chain_length, rank=rank)


# -- shared pieces -------------------------------------------------------------------------


def _split_starts(starts: torch.Tensor, chain: ChainGeometry):
    """``S_A`` ``(out, M r)`` and ``S_B`` ``(in, M r)`` from the chain starts, contiguous
    (scratch)."""
    flat = starts.view(-1, starts.shape[2])
    columns = flat.shape[0]
    out_dim, in_dim = chain.block_sizes
    S_A = scratch("S_A", (out_dim, columns), starts).copy_(flat[:, chain.rows(0)].T)
    S_B = scratch("S_B", (in_dim, columns), starts).copy_(flat[:, chain.rows(1)].T)
    return S_A, S_B


def _start_gradients(starts: torch.Tensor, chain: ChainGeometry):
    """A zero gradient of the chain starts (scratch) and its views ``dS_A^T`` ``(M r, out)``
    and ``dS_B^T`` ``(M r, in)``, for products to write into."""
    gradient = scratch("starts_gradient", tuple(starts.shape), starts).zero_()
    flat = gradient.view(-1, starts.shape[2])
    return gradient, flat[:, chain.rows(0)], flat[:, chain.rows(1)]


def _cut(chain: ChainGeometry, r: int) -> int | None:
    """Columns of the chain starts whose chains are complete, if the last one is cut."""
    if chain.last_chain_length == chain.chain_length:
        return None
    return (chain.nb_chains - 1) * r


def _starts(A_bands, B_bands, G, H, chain: ChainGeometry, keep: bool):
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


def _starts_backward(A_bands, B_bands, starts, gradient, chain: ChainGeometry):
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


def _first_term(S_A, S_B, chain: ChainGeometry, W0: torch.Tensor) -> torch.Tensor:
    """``W_0 = S_A S_B^T`` into ``W0``; returns ``W_0`` without the cut last chain's starts
    (the Horner steps past the end of that chain add only the complete chains), which is
    ``W0`` itself when no chain is cut."""
    cut = _cut(chain, S_A.shape[1] // chain.nb_chains)
    if cut is None:
        return torch.mm(S_A, S_B.T, out=W0)
    W0_cut = torch.mm(S_A[:, :cut], S_B[:, :cut].T, out=scratch("W0_cut", W0.shape, W0))
    torch.addmm(W0_cut, S_A[:, cut:], S_B[:, cut:].T, out=W0)
    return W0_cut


def _horner(A_bands, B_bands, W0, W0_cut, chain: ChainGeometry, slots, W=None) -> None:
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

    A_parts = coefficient_parts(A_bands, rows=True)
    B_parts = transposed_parts(B_bands)
    X_rows, X_columns = row_parts(X), column_parts(X)
    slots[b - 2].copy_(W0 if b - 1 < last else W0_cut)
    for step in range(b - 2, 0 if W is None else -1, -1):
        source = slots[step]
        stencil(A_parts, source, parts(source, rows, row_parts), X, X_rows)
        target = slots[step - 1] if step > 0 else W
        base = W0 if step < last else W0_cut
        stencil(B_parts, X, X_columns, target, parts(target, columns, column_parts), base)


def explicit_forward(A_bands, B_bands, G, H, chain: ChainGeometry, keep: bool):
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


def explicit_backward(dW, A_bands, B_bands, starts, W0, chain: ChainGeometry):
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
        A_rows, A_T_rows = coefficient_parts(A_bands, True), transposed_parts(A_bands, True)
        B_columns = coefficient_parts(B_bands, rows=False)  # dX = dH B^T
        X_rows, dX_rows, dX_columns = row_parts(X_step), row_parts(dX), column_parts(dX)
        dH_rows, dH_columns = row_parts(dH), column_parts(dH)
        for step, H_next in enumerate(horner.unbind(1)):
            # H_l = W0 + X_l B and X_l = A H_(l+1)
            stencil(A_rows, H_next, row_parts(H_next), X_step, X_rows)
            dB += band_dots(X_step.T, dH.T)
            stencil(B_columns, dH, dH_columns, dX, dX_columns)
            dA += band_dots(dX, H_next)
            stencil(A_T_rows, dX, dX_rows, dH, dH_rows)
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


def factored_forward(U, A_bands, B_bands, G, H, chain: ChainGeometry, keep: bool):
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
    B_rows = coefficient_parts(B_bands, rows=True)
    for step in range(1, b):
        stencil_rows(B_rows, V[:, step - 1], V[:, step])
    Z = new("Z", (columns, b, batch))
    torch.mm(S_B.T, V.view(in_dim, b * batch), out=Z.view(columns, b * batch))
    cut = _cut(chain, columns // chain.nb_chains)
    if cut is not None:
        Z[cut:, last:] = 0.0
    Q = new("Q", (out_dim, b, batch))
    torch.mm(S_A, Z.view(columns, b * batch), out=Q.view(out_dim, b * batch))
    A_rows = coefficient_parts(A_bands, rows=True)
    for step in range(b - 2, -1, -1):
        stencil_rows(A_rows, Q[:, step + 1], Q[:, step], base=Q[:, step])
    Y = Q[:, 0].T.clone(memory_format=torch.contiguous_format)  # never a view of Q
    if not keep:
        return Y, *(U.new_empty(0) for _ in range(4))
    return Y, starts, V, Z, Q


def factored_backward(dY, U, A_bands, B_bands, starts, V, Z, Q, chain: ChainGeometry, input_grad):
    """Gradients ``(dU, dA_bands, dB_bands, dG, dH)`` of :func:`factored_forward`'s ``Y``;
    ``dU`` is empty unless ``input_grad``."""
    out_dim, in_dim = chain.block_sizes
    b, last, batch, r = chain.chain_length, chain.last_chain_length, U.shape[0], starts.shape[1]
    S_A, S_B = _split_starts(starts, chain)
    columns = S_A.shape[1]
    dQ = scratch("dQ", (out_dim, b, batch), dY)
    dQ[:, 0].copy_(dY.T)
    A_T_rows = transposed_parts(A_bands, rows=True)
    for step in range(b - 1):
        stencil_rows(A_T_rows, dQ[:, step], dQ[:, step + 1])
    dA = band_dots(dQ[:, : b - 1].reshape(out_dim, -1), Q[:, 1:].reshape(out_dim, -1))
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
    B_T_rows = transposed_parts(B_bands, rows=True)
    for step in range(b - 2, -1, -1):
        stencil_rows(B_T_rows, dV[:, step + 1], dV[:, step], base=dV[:, step])
    dB = band_dots(dV[:, 1:].reshape(in_dim, -1), V[:, : b - 1].reshape(in_dim, -1))
    dU = dV[:, 0].T.clone(memory_format=torch.contiguous_format) if input_grad else U.new_empty(0)
    dA_starts, dB_starts, dG, dH = _starts_backward(A_bands, B_bands, starts, gradient, chain)
    return dU, dA + dA_starts, dB + dB_starts, dG, dH
