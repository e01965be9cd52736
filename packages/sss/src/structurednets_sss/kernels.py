"""The SSS matrix-vector product over a batch, in stage stacks that merge the kinds.

The stage matrices are held, padded once to the largest block and state sizes (zeros in the
padding; the layer builds the stacks with one gather from its parameters), as four stacks:

* ``S_in`` ``(K, mb + dx + dz, nb)``: per stage ``[D_k; B_k; F_k]``, everything that acts on
  the input block ``u_k`` (``B_{K-1}`` and ``F_0`` are zero);
* ``S_out`` ``(K, mb, dx + dz)``: per stage ``[C_k, G_k]``, everything that reads the states
  of stage ``k`` (``C_0`` and ``G_{K-1}`` are zero);
* ``A`` ``(K-2, dx, dx)`` and ``E`` ``(K-2, dz, dz)``: the transitions of stages ``1 .. K-2``.

The input is ``(batch, K * nb)``, block ``k`` in columns ``k * nb .. (k + 1) * nb``; the
output ``(batch, K * mb)`` likewise. Forward is two batched products (``S_in``, then
``S_out``) around the two state recursions (``K - 2`` small products each); backward is four
batched products, the adjoint recursions and one batched product per transition gradient.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from structurednets.precision import accumulation_dtype

__all__ = ["SSSMultiply", "padded_dense", "split_stacks", "sss_product"]


class SSSMultiply(torch.autograd.Function):
    """``Y = U @ W.T`` for the SSS matrix ``W`` given by the stage stacks (see the module).

    ``apply(U, S_in, S_out, A, E, dx)``: ``dx`` (an int) is the padded causal state size.
    Forward and backward cost ``O(batch * stacked entries)``; the backward pass runs the
    adjoint recursions by hand. First-order only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, U, S_in, S_out, A, E, dx):
        Y, Q = sss_product(U, S_in, S_out, A, E, dx)
        ctx.save_for_backward(U, S_in, S_out, A, E, Q)
        ctx.dx = dx
        return Y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_Y):
        U, S_in, S_out, A, E, Q = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = ctx.dx
        K, rows, nb = S_in.shape
        mb = S_out.shape[1]
        batch = U.shape[0]
        Ub = U.view(batch, K, nb).transpose(0, 1)
        gY = grad_Y.reshape(batch, K, mb).transpose(0, 1)  # (K, batch, mb)
        gS_out = gA = gE = None
        if K > 1:
            # R[k] = dloss/dQ[k]: the recursions of forward, mirrored (transitions A, E).
            R = torch.bmm(gY, S_out)
            if need[2]:
                gS_out = torch.bmm(gY.transpose(1, 2), Q)
            _adjoint_recursions(R, dx, A, E)
            if need[3]:
                gA = torch.bmm(R[2:, :, :dx].transpose(1, 2), Q[1:-1, :, :dx])
            if need[4]:
                gE = torch.bmm(R[:-2, :, dx:].transpose(1, 2), Q[1:-1, :, dx:])
            gP = gY.new_empty(K, batch, rows)
            gP[:, :, :mb] = gY
            gP[:-1, :, mb : mb + dx] = R[1:, :, :dx]
            gP[-1, :, mb : mb + dx] = 0
            gP[1:, :, mb + dx :] = R[:-1, :, dx:]
            gP[0, :, mb + dx :] = 0
        else:
            gP = gY
        gU = torch.bmm(gP, S_in).transpose(0, 1).reshape(batch, K * nb) if need[0] else None
        gS_in = torch.bmm(gP.transpose(1, 2), Ub) if need[1] else None
        return gU, gS_in, gS_out, gA, gE, None


def sss_product(U, S_in, S_out, A, E, dx):
    """The forward of :class:`SSSMultiply` without autograd: ``(Y, Q)``, ``Q`` the states
    ``[x_k, z_k]`` of every stage ``(K, batch, dx + dz)`` (``None`` for one stage)."""
    K, rows, nb = S_in.shape
    mb = S_out.shape[1]
    batch = U.shape[0]
    Ub = U.view(batch, K, nb).transpose(0, 1)  # (K, batch, nb)
    P = torch.bmm(Ub, S_in.transpose(1, 2))  # (K, batch, mb + dx + dz)
    if K == 1:
        return P.transpose(0, 1).reshape(batch, mb), None
    # Q[k] = [x_k, z_k]: x_{k+1} = A_k x_k + B_k u_k, z_{k-1} = E_k z_k + F_k u_k.
    Q = P.new_empty(K, batch, rows - mb)  # written once each below, not zeroed first
    Q[0, :, :dx] = 0
    Q[1:, :, :dx] = P[:-1, :, mb : mb + dx]
    Q[:-1, :, dx:] = P[1:, :, mb + dx :]
    Q[-1, :, dx:] = 0
    _recursions(Q, dx, A.transpose(1, 2), E.transpose(1, 2))
    Y = torch.baddbmm(P[:, :, :mb], Q, S_out.transpose(1, 2))
    return Y.transpose(0, 1).reshape(batch, K * mb), Q


def _in_accumulation_dtype(run):
    """Run a recursion on ``(Q, dx, A, E)`` in the accumulation dtype: in float16 and bfloat16
    the states accumulate in float32 and are rounded once at the end. Rounded at every
    stage, their error grows with the number of stages (128 stages: 5.8x a bfloat16
    ``nn.Linear``'s error at 512 x 512, against 1.6x in float32)."""

    def wrapped(Q, dx, A, E):
        wide = accumulation_dtype(Q.dtype)
        if wide == Q.dtype:
            run(Q, dx, A, E)
        else:
            states = Q.to(wide)
            run(states, dx, A.to(wide), E.to(wide))
            Q.copy_(states)

    return wrapped


@_in_accumulation_dtype
def _recursions(Q, dx, A_t, E_t):
    """In place: ``Q[k, :, :dx] += Q[k-1, :, :dx] @ A_t[k-2]`` for ``k = 2 .. K-1``, then
    ``Q[k, :, dx:] += Q[k+1, :, dx:] @ E_t[k]`` for ``k = K-3 .. 0``."""
    K = Q.shape[0]
    if K < 3:
        return
    causal, anticausal = Q[:, :, :dx].unbind(0), Q[:, :, dx:].unbind(0)
    steps = A_t.unbind(0)
    if dx:
        for k in range(2, K):
            causal[k].addmm_(causal[k - 1], steps[k - 2])
    steps = E_t.unbind(0)
    if Q.shape[2] > dx:
        for k in range(K - 3, -1, -1):
            anticausal[k].addmm_(anticausal[k + 1], steps[k])


@_in_accumulation_dtype
def _adjoint_recursions(R, dx, A, E):
    """In place, the adjoints of :func:`_recursions`: ``R[k-1, :, :dx] += R[k, :, :dx] @
    A[k-2]`` for ``k = K-1 .. 2``, and ``R[k+1, :, dx:] += R[k, :, dx:] @ E[k]`` for
    ``k = 0 .. K-3``."""
    K = R.shape[0]
    if K < 3:
        return
    causal, anticausal = R[:, :, :dx].unbind(0), R[:, :, dx:].unbind(0)
    steps = A.unbind(0)
    if dx:
        for k in range(K - 1, 1, -1):
            causal[k - 1].addmm_(causal[k], steps[k - 2])
    steps = E.unbind(0)
    if R.shape[2] > dx:
        for k in range(K - 2):
            anticausal[k + 1].addmm_(anticausal[k], steps[k])


def split_stacks(S_in, S_out, A, E, dx):
    """The per-kind stacks ``(D, A, B, C, E, F, G)`` as views of the merged ones: ``D``
    ``(K, mb, nb)``; ``B``, ``G`` over stages ``0 .. K-2``; ``C``, ``F`` over ``1 .. K-1``;
    ``A``, ``E`` over ``1 .. K-2``."""
    mb = S_out.shape[1]
    return (
        S_in[:, :mb],
        A,
        S_in[:-1, mb : mb + dx],
        S_out[1:, :, :dx],
        E,
        S_in[1:, mb + dx :],
        S_out[:-1, :, dx:],
    )


def padded_dense(D, A, B, C, E, F, G):
    """The padded ``W``, shape ``(K * mb, K * nb)``, from the per-kind padded stacks
    (:func:`split_stacks`); differentiable.

    Builds the state of every input column stage by stage (``x_{k+1} = A_k x_k + B_k e_j``),
    ``O(output_dim * input_dim * state_dim)`` operations instead of the
    ``O(input_dim * nb_parameters)`` of multiplying the identity.
    """
    K, mb, nb = D.shape
    dense = torch.block_diag(*D.unbind(0)) if K > 1 else D[0]
    if K == 1:
        return dense
    width = K * nb

    def placed(block: torch.Tensor, k: int) -> torch.Tensor:
        return torch.nn.functional.pad(block, (k * nb, width - (k + 1) * nb))

    # Causal: block row k (k >= 1) is C_k x_k, with x_k as a function of all inputs.
    rows = [D.new_zeros(mb, width)]
    state = placed(B[0], 0)
    for k in range(1, K):
        rows.append(C[k - 1] @ state)
        if k < K - 1:
            state = A[k - 1] @ state + placed(B[k], k)
    lower = torch.cat(rows)
    # Anticausal: block row k (k <= K-2) is G_k z_k.
    rows = [D.new_zeros(mb, width)]
    state = placed(F[K - 2], K - 1)
    for k in range(K - 2, -1, -1):
        rows.append(G[k] @ state)
        if k > 0:
            state = E[k - 1] @ state + placed(F[k - 1], k)
    upper = torch.cat(rows[::-1])
    return dense + lower + upper
