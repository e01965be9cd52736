"""The LDR matrix ``W = sum_(k<m) A^k G H^T B^k`` and its product with a batch, fast.

With ``k = J b + l`` and the chain starts ``S_A``, ``S_B`` of :mod:`structurednets_ldr.krylov`,

    ``W = sum_(l<b) A^l W_0 B^l``,  ``W_0 = S_A S_B^T``  (rank ``M r``, ``M = ceil(m / b)``),

evaluated by Horner's rule, ``H_(b-1) = W_0``, ``H_l = W_0 + A H_(l+1) B``: ``b - 1`` steps of
two three-band stencils, never a Krylov matrix. Two forms:

- explicit: build ``W`` (one ``out x M r x in`` product and ``b - 1`` Horner steps on
  ``out x in``), then ``U W^T``; cheapest when the batch is large;
- factored: ``U W^T = (sum_l A^l S_A S_B^T B^l U^T)^T``: ``V_l = B^l U^T`` by stencils,
  ``Z = S_B^T [V_0 ... V_(b-1)]`` and ``S_A Z`` in two products, then Horner with ``A``
  on ``out x batch`` blocks; cheapest for small batches.

Both have hand-written backward passes (Horner's adjoint, band gradients as banded dot
products); the gradient with respect to the chain starts goes through
:func:`~structurednets_ldr.krylov.chain_starts_backward`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from structurednets_ldr.krylov import (
    ChainPlan,
    chain_starts,
    chain_starts_backward,
    combined_coefficients,
    make_chain_plan,
    power_chunks,
)
from structurednets_ldr.operators import transpose_bands

__all__ = [
    "LDRPlan",
    "choose_plan",
    "ldr_multiply",
    "ldr_weight",
    "release_workspace",
]


# -- scratch memory ------------------------------------------------------------------------


class _Workspace(threading.local):
    """Per-thread scratch tensors reused from call to call.

    Fresh multi-megabyte CPU tensors cost page faults on every call (the C allocator hands
    big blocks back to the system), which costs as much as the arithmetic here; so the
    Horner intermediates live in buffers that are kept. What a forward pass leaves for its
    backward pass carries an owner token: a later forward pass (another layer, or the same
    one again) takes the buffers over, and the earlier backward pass then recomputes them.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}
        self.owner: dict[tuple[torch.dtype, str], object] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (name, like.dtype, str(like.device))
        numel = math.prod(shape)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self.buffers.pop(key, None)
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.buffers[key] = buffer
        return buffer[:numel].view(shape)

    def claim(self, like: torch.Tensor) -> object:
        token = object()
        self.owner[(like.dtype, str(like.device))] = token
        return token

    def owns(self, like: torch.Tensor, token: object) -> bool:
        return self.owner.get((like.dtype, str(like.device))) is token


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are otherwise kept for the next call)."""
    _WORKSPACE.buffers.clear()
    _WORKSPACE.owner.clear()


# -- three-band stencils and banded dot products -------------------------------------------


def _stencil_rows(bands, source, target, base=None) -> None:
    """``target = base + A source``; ``A`` periodic three-band ``(3, n)`` acting on rows."""
    minus, centre, plus = bands[0].unsqueeze(1), bands[1].unsqueeze(1), bands[2].unsqueeze(1)
    if base is None:
        torch.mul(source, centre, out=target)
    else:
        torch.addcmul(base, source, centre, out=target)
    target[1:].addcmul_(source[:-1], minus[1:])
    target[:1].addcmul_(source[-1:], minus[:1])
    target[:-1].addcmul_(source[1:], plus[:-1])
    target[-1:].addcmul_(source[:1], plus[-1:])


def _stencil_columns(bands_T, source, target, base=None) -> None:
    """``target = base + source M``, where ``bands_T`` are the bands of ``M^T``."""
    minus, centre, plus = bands_T[0], bands_T[1], bands_T[2]
    if base is None:
        torch.mul(source, centre, out=target)
    else:
        torch.addcmul(base, source, centre, out=target)
    target[:, 1:].addcmul_(source[:, :-1], minus[1:])
    target[:, :1].addcmul_(source[:, -1:], minus[:1])
    target[:, :-1].addcmul_(source[:, 1:], plus[:-1])
    target[:, -1:].addcmul_(source[:, :1], plus[-1:])


_BOUNDARY_CACHE: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


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
    key = (n, nb_chunks * size, str(left.device))
    if key not in _BOUNDARY_CACHE:
        rows = torch.tensor(sorted({0, n - 1, *range(1 + nb_chunks * size, n - 1)}))
        neighbours = (rows[:, None] + torch.tensor([-1, 0, 1])) % n
        _BOUNDARY_CACHE[key] = (rows.to(left.device), neighbours.reshape(-1).to(left.device))
    rows, neighbours = _BOUNDARY_CACHE[key]
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
_COARSE_STEP = 25e-6
_COARSE_ROW = 4e-9


@dataclass(frozen=True, eq=False)
class LDRPlan:
    """How to evaluate one LDR product: the form and the chain plan.

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


def _estimate(explicit: bool, out_dim, in_dim, m, r, batch, b) -> float:
    M = math.ceil(m / b)
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


def choose_plan(
    out_dim: int,
    in_dim: int,
    nb_columns: int,
    nb_generators: int,
    batch: int | None,
    *,
    explicit: bool | None = None,
    chain_length: int | None = None,
) -> tuple[bool, int]:
    """``(explicit, chain_length)`` with the least estimated time for this batch size.

    ``batch=None`` means building ``W`` alone (``to_dense``), which is always explicit.
    """
    forms = (True,) if batch is None else (True, False) if explicit is None else (explicit,)
    lengths = (
        (chain_length,)
        if chain_length
        else sorted(
            {min(nb_columns, max(1, round(nb_columns / M))) for M in range(1, nb_columns + 1)}
        )
    )
    # The explicit form keeps b - 1 matrices H_l: at most 2 r, the size of K_A and K_B.
    best = min(
        (_estimate(form, out_dim, in_dim, nb_columns, nb_generators, batch, b), form, b)
        for form in forms
        for b in lengths
        if chain_length or not form or b - 1 <= 2 * nb_generators
    )
    return best[1], best[2]


def make_plan(
    out_dim: int, in_dim: int, nb_columns: int, explicit: bool, chain_length: int
) -> LDRPlan:
    """An :class:`LDRPlan` for ``out x in`` matrices with ``nb_columns`` Krylov columns."""
    return LDRPlan(explicit, make_chain_plan((out_dim, in_dim), nb_columns, chain_length))


# -- shared pieces -------------------------------------------------------------------------


def _split_starts(starts: torch.Tensor, chain: ChainPlan):
    """``S_A`` ``(out, M r)`` and ``S_B`` ``(in, M r)`` from the chain starts, contiguous."""
    flat = starts.view(-1, starts.shape[2])
    return flat[:, chain.rows(0)].T.contiguous(), flat[:, chain.rows(1)].T.contiguous()


def _join_start_gradients(dS_A, dS_B, starts, chain: ChainPlan) -> torch.Tensor:
    gradient = torch.zeros_like(starts)
    flat = gradient.view(-1, starts.shape[2])
    flat[:, chain.rows(0)] = dS_A.T
    flat[:, chain.rows(1)] = dS_B.T
    return gradient


def _cut(chain: ChainPlan, r: int) -> int | None:
    """Columns of the chain starts whose chains are complete, if the last one is cut."""
    if chain.last_chain_length == chain.chain_length:
        return None
    return (chain.nb_chains - 1) * r


# -- explicit form -------------------------------------------------------------------------


def _horner_weight(A_bands, B_bands, S_A, S_B, chain: ChainPlan, H, X, W) -> None:
    """``W = sum_l A^l W_0 B^l`` by Horner's rule, keeping every ``H_(l+1)``.

    ``H`` is ``(out, b - 1, in)`` (``H[:, l] = H_(l+1)``); ``X`` ``(out, in)`` is scratch for
    ``A H_(l+1)``.
    """
    b, last = chain.chain_length, chain.last_chain_length
    cut = _cut(chain, S_A.shape[1] // chain.nb_chains)
    if cut is None:
        W0 = W0_cut = S_A @ S_B.T
    else:
        W0_cut = S_A[:, :cut] @ S_B[:, :cut].T
        W0 = torch.addmm(W0_cut, S_A[:, cut:], S_B[:, cut:].T)
    if b == 1:
        W.copy_(W0)
        return
    B_T = transpose_bands(B_bands)
    H[:, b - 2].copy_(W0 if b - 1 < last else W0_cut)
    for step in range(b - 2, -1, -1):
        _stencil_rows(A_bands, H[:, step], X)
        target = H[:, step - 1] if step > 0 else W
        _stencil_columns(B_T, X, target, base=W0 if step < last else W0_cut)


class _Weight(torch.autograd.Function):
    """``(A_bands, B_bands, P, X) -> W``."""

    @staticmethod
    def forward(ctx, A_bands, B_bands, P, X, plan):
        chain = plan.chain
        out_dim, in_dim = chain.block_sizes
        b = chain.chain_length
        starts = chain_starts(P, X, chain)
        S_A, S_B = _split_starts(starts, chain)
        H = _WORKSPACE.take("horner", (out_dim, max(b - 1, 0), in_dim), X)
        scratch = _WORKSPACE.take("horner_x", (out_dim, in_dim), X)
        W = X.new_empty(out_dim, in_dim)
        _horner_weight(A_bands, B_bands, S_A, S_B, chain, H, scratch, W)
        ctx.plan = plan
        ctx.token = _WORKSPACE.claim(X)
        ctx.save_for_backward(A_bands, B_bands, P, X, starts, S_A, S_B)
        return W

    @staticmethod
    @once_differentiable
    def backward(ctx, dW):
        A_bands, B_bands, P, X, starts, S_A, S_B = ctx.saved_tensors
        chain = ctx.plan.chain
        out_dim, in_dim = chain.block_sizes
        b, last, r = chain.chain_length, chain.last_chain_length, X.shape[1]
        H = _WORKSPACE.take("horner", (out_dim, max(b - 1, 0), in_dim), X)
        X_step = _WORKSPACE.take("horner_x", (out_dim, in_dim), X)
        if b > 1 and not _WORKSPACE.owns(X, ctx.token):
            W = _WORKSPACE.take("horner_w", (out_dim, in_dim), X)
            _horner_weight(A_bands, B_bands, S_A, S_B, chain, H, X_step, W)
            ctx.token = _WORKSPACE.claim(X)
        dA = A_bands.new_zeros(3, out_dim)
        dB = B_bands.new_zeros(3, in_dim)
        dH = dW.contiguous().clone()
        D_all = dH.clone()
        D_early = dH.clone() if last < b else None
        if b > 1:
            A_T = transpose_bands(A_bands)
            dX = _WORKSPACE.take("horner_dx", (out_dim, in_dim), X)
            for step in range(b - 1):
                # H_l = W0 + X_l B and X_l = A H_(l+1)
                _stencil_rows(A_bands, H[:, step], X_step)
                dB += _band_dots(X_step.T, dH.T)
                _stencil_columns(B_bands, dH, dX)
                dA += _band_dots(dX, H[:, step])
                _stencil_rows(A_T, dX, dH)
                D_all += dH
                if D_early is not None and step + 1 < last:
                    D_early += dH
        cut = _cut(chain, r)
        if cut is None:
            dS_A, dS_B = D_all @ S_B, D_all.T @ S_A
        else:
            dS_A = torch.cat((D_all @ S_B[:, :cut], D_early @ S_B[:, cut:]), dim=1)
            dS_B = torch.cat((D_all.T @ S_A[:, :cut], D_early.T @ S_A[:, cut:]), dim=1)
        gradient = _join_start_gradients(dS_A, dS_B, starts, chain)
        dP, dX0 = chain_starts_backward(P, starts, gradient, chain)
        return dA, dB, dP, dX0, None


# -- factored form -------------------------------------------------------------------------


class _Product(torch.autograd.Function):
    """``(U, A_bands, B_bands, P, X) -> U W^T`` without ``W``."""

    @staticmethod
    def forward(ctx, U, A_bands, B_bands, P, X, plan):
        chain = plan.chain
        starts = chain_starts(P, X, chain)
        S_A, S_B = _split_starts(starts, chain)
        _, _, Q = _factored_forward(U, A_bands, B_bands, S_A, S_B, chain)
        ctx.plan = plan
        ctx.token = _WORKSPACE.claim(X)
        ctx.save_for_backward(U, A_bands, B_bands, P, X, starts, S_A, S_B)
        return U.new_empty(U.shape[0], Q.shape[0]).copy_(Q[:, 0].T)

    @staticmethod
    @once_differentiable
    def backward(ctx, dY):
        U, A_bands, B_bands, P, X, starts, S_A, S_B = ctx.saved_tensors
        chain = ctx.plan.chain
        out_dim, in_dim = chain.block_sizes
        b, last, batch, r = chain.chain_length, chain.last_chain_length, U.shape[0], X.shape[1]
        columns = S_A.shape[1]
        if _WORKSPACE.owns(X, ctx.token):
            V = _WORKSPACE.take("factored_v", (in_dim, b, batch), X)
            Z = _WORKSPACE.take("factored_z", (columns, b, batch), X)
            Q = _WORKSPACE.take("factored_q", (out_dim, b, batch), X)
        else:
            V, Z, Q = _factored_forward(U, A_bands, B_bands, S_A, S_B, chain)
            ctx.token = _WORKSPACE.claim(X)
        dQ = _WORKSPACE.take("factored_dq", (out_dim, b, batch), X)
        dQ[:, 0].copy_(dY.T)
        A_T = transpose_bands(A_bands)
        for step in range(b - 1):
            _stencil_rows(A_T, dQ[:, step], dQ[:, step + 1])
        dA = _band_dots(dQ[:, : b - 1].reshape(out_dim, -1), Q[:, 1:].reshape(out_dim, -1))
        dQ_flat = dQ.view(out_dim, b * batch)
        dS_A = dQ_flat @ Z.view(columns, b * batch).T
        dZ = _WORKSPACE.take("factored_dz", (columns, b, batch), X)
        torch.mm(S_A.T, dQ_flat, out=dZ.view(columns, b * batch))
        cut = _cut(chain, r)
        if cut is not None:
            dZ[cut:, last:] = 0.0
        dS_B = V.view(in_dim, b * batch) @ dZ.view(columns, b * batch).T
        dV = _WORKSPACE.take("factored_dv", (in_dim, b, batch), X)
        torch.mm(S_B, dZ.view(columns, b * batch), out=dV.view(in_dim, b * batch))
        B_T = transpose_bands(B_bands)
        for step in range(b - 2, -1, -1):
            _stencil_rows(B_T, dV[:, step + 1], dV[:, step], base=dV[:, step])
        dB = _band_dots(dV[:, 1:].reshape(in_dim, -1), V[:, : b - 1].reshape(in_dim, -1))
        dU = U.new_empty(U.shape).copy_(dV[:, 0].T) if ctx.needs_input_grad[0] else None
        gradient = _join_start_gradients(dS_A, dS_B, starts, chain)
        dP, dX0 = chain_starts_backward(P, starts, gradient, chain)
        return dU, dA, dB, dP, dX0, None


def _factored_forward(U, A_bands, B_bands, S_A, S_B, chain: ChainPlan):
    """``V_l = B^l U^T``, ``Z = S_B^T V``, ``Q_l = S_A Z_l + A Q_(l+1)`` in the workspace."""
    out_dim, in_dim = chain.block_sizes
    b, last, batch = chain.chain_length, chain.last_chain_length, U.shape[0]
    columns = S_A.shape[1]
    V = _WORKSPACE.take("factored_v", (in_dim, b, batch), U)
    Z = _WORKSPACE.take("factored_z", (columns, b, batch), U)
    Q = _WORKSPACE.take("factored_q", (out_dim, b, batch), U)
    V[:, 0].copy_(U.T)
    for step in range(1, b):
        _stencil_rows(B_bands, V[:, step - 1], V[:, step])
    torch.mm(S_B.T, V.view(in_dim, b * batch), out=Z.view(columns, b * batch))
    cut = _cut(chain, columns // chain.nb_chains)
    if cut is not None:
        Z[cut:, last:] = 0.0
    torch.mm(S_A, Z.view(columns, b * batch), out=Q.view(out_dim, b * batch))
    for step in range(b - 2, -1, -1):
        _stencil_rows(A_bands, Q[:, step + 1], Q[:, step], base=Q[:, step])
    return V, Z, Q


# -- public functions ----------------------------------------------------------------------


def ldr_weight(
    A_bands: torch.Tensor,
    B_bands: torch.Tensor,
    G: torch.Tensor,
    H: torch.Tensor,
    plan: LDRPlan,
) -> torch.Tensor:
    """``W = sum_(k<m) A^k G H^T B^k``, shape ``(out, in)``; differentiable.

    Equals ``sum_i K(A, g_i) K(B^T, h_i)^T`` with ``m``-column Krylov matrices.
    """
    P = power_chunks(combined_coefficients(A_bands, B_bands), plan.chain)
    return _Weight.apply(A_bands, B_bands, P, torch.cat((G, H)), plan)


def ldr_multiply(
    U: torch.Tensor,
    A_bands: torch.Tensor,
    B_bands: torch.Tensor,
    G: torch.Tensor,
    H: torch.Tensor,
    plan: LDRPlan,
) -> torch.Tensor:
    """``U @ W.T`` for ``U`` ``(batch, in)``, in the form ``plan`` says; differentiable."""
    if plan.explicit:
        return U @ ldr_weight(A_bands, B_bands, G, H, plan).T
    P = power_chunks(combined_coefficients(A_bands, B_bands), plan.chain)
    return _Product.apply(U, A_bands, B_bands, P, torch.cat((G, H)), plan)
