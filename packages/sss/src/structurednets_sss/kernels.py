"""The SSS matrix-vector product over a batch, in a padded stage-stacked layout.

Every kind of stage matrix is held as a stack over the stages that use it, padded to the
largest block and state sizes (zeros in the padding): ``D`` (K, mb, nb) for stages
``0 .. K-1``; ``B`` (K-1, dx, nb) and ``G`` (K-1, mb, dz) for stages ``0 .. K-2``; ``C``
(K-1, mb, dx) and ``F`` (K-1, dz, nb) for stages ``1 .. K-1``; ``A`` (K-2, dx, dx) and ``E``
(K-2, dz, dz) for stages ``1 .. K-2``. The input is ``(batch, K * nb)``, block ``k`` in columns
``k * nb .. (k + 1) * nb``; the output ``(batch, K * mb)`` likewise.

All products over the stages are batched matrix products; only the two state recursions
(``K - 2`` small matrix products each) run stage by stage, in forward and in backward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from structurednets.precision import accumulation_dtype

__all__ = ["PADDED_KINDS", "SSSMultiply", "padded_dense"]

#: The argument order of :class:`SSSMultiply` after the input.
PADDED_KINDS = ("D", "A", "B", "C", "E", "F", "G")


class SSSMultiply(torch.autograd.Function):
    """``Y = U @ W.T`` for the SSS matrix ``W`` given by padded stage stacks.

    Forward and backward cost ``O(batch * nb_parameters)`` (with padding). The backward
    pass runs the adjoint recursions by hand and computes every parameter gradient with
    one batched product per kind. First-order only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, U, D, A, B, C, E, F, G):
        K, mb, nb = D.shape
        batch = U.shape[0]
        Ub = U.view(batch, K, nb).transpose(0, 1)  # (K, batch, nb)
        Y = torch.bmm(Ub, D.transpose(1, 2))  # (K, batch, mb)
        X = Z = None
        if K > 1:
            # X[i] = x_{i+1} = A_i x_i + B_i u_i;  Z[i] = z_i = E_{i+1} z_{i+1} + F_{i+1} u_{i+1}
            X = torch.bmm(Ub[:-1], B.transpose(1, 2))
            Z = torch.bmm(Ub[1:], F.transpose(1, 2))
            X, Z = _recursions(X, Z, A.transpose(1, 2), E.transpose(1, 2))
            Y[1:].baddbmm_(X, C.transpose(1, 2))
            Y[:-1].baddbmm_(Z, G.transpose(1, 2))
        ctx.save_for_backward(U, D, A, B, C, E, F, G, X, Z)
        return Y.transpose(0, 1).reshape(batch, K * mb)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_Y):
        U, D, A, B, C, E, F, G, X, Z = ctx.saved_tensors
        need = ctx.needs_input_grad
        K, mb, nb = D.shape
        batch = U.shape[0]
        Ub = U.view(batch, K, nb).transpose(0, 1)
        gY = grad_Y.reshape(batch, K, mb).transpose(0, 1)  # (K, batch, mb)
        gU = torch.bmm(gY, D) if need[0] else None  # (K, batch, nb)
        gD = torch.bmm(gY.transpose(1, 2), Ub) if need[1] else None
        gA = gB = gC = gE = gF = gG = None
        if K > 1:
            # Adjoints: L[i] = dloss/dX[i] runs backwards through the stages (transitions
            # A^T), M[i] = dloss/dZ[i] forwards (E^T): the recursions of forward, mirrored.
            L = torch.bmm(gY[1:], C)
            M = torch.bmm(gY[:-1], G)
            M, L = _recursions(M, L, E, A)
            if need[2]:
                gA = torch.bmm(L[1:].transpose(1, 2), X[:-1])
            if need[3]:
                gB = torch.bmm(L.transpose(1, 2), Ub[:-1])
            if need[4]:
                gC = torch.bmm(gY[1:].transpose(1, 2), X)
            if need[5]:
                gE = torch.bmm(M[:-1].transpose(1, 2), Z[1:])
            if need[6]:
                gF = torch.bmm(M.transpose(1, 2), Ub[1:])
            if need[7]:
                gG = torch.bmm(gY[:-1].transpose(1, 2), Z)
            if gU is not None:
                gU[:-1].baddbmm_(L, B)
                gU[1:].baddbmm_(M, F)
        if gU is not None:
            gU = gU.transpose(0, 1).reshape(batch, K * nb)
        return gU, gD, gA, gB, gC, gE, gF, gG


# Up to this batch size the two recursions run jointly (measured on one CPU thread: joint
# stepping wins below ~100 rows of 29-dimensional states, loses at 128 and more).
_JOINT_MAX_BATCH = 64


def _recursions(
    forward: torch.Tensor,
    backward: torch.Tensor,
    forward_steps: torch.Tensor,
    backward_steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``forward[i] += forward[i-1] @ forward_steps[i-1]`` for ``i = 1 .. K-2`` and
    ``backward[i] += backward[i+1] @ backward_steps[i]`` for ``i = K-3 .. 0``.

    ``forward``/``backward`` are ``(K-1, batch, d)``, the steps ``(K-2, d, d)``. For small
    batches, where each step costs mostly its call, and states of the same dimension, the two
    recursions advance together, one batched product of two per step (the backward one stored
    in reverse stage order): half the calls, for two copies of the states. Otherwise they run
    one after the other, in place. Returns the two results.

    In float16 and bfloat16 the states accumulate in float32 (rounded once at the end):
    rounded at every stage, their error grows with the number of stages (128 stages: 5.8x a
    bfloat16 ``nn.Linear``'s error at 512 x 512, against 1.6x in float32).
    """
    dtype = forward.dtype
    if accumulation_dtype(dtype) != dtype:
        wide = accumulation_dtype(dtype)
        forward, backward = _recursions(
            forward.to(wide), backward.to(wide), forward_steps.to(wide), backward_steps.to(wide)
        )
        return forward.to(dtype), backward.to(dtype)
    steps = forward_steps.shape[0]
    batch = forward.shape[1]
    if steps and batch <= _JOINT_MAX_BATCH and forward.shape[-1] == backward.shape[-1]:
        both = torch.stack([forward, backward.flip(0)], dim=1)  # (K-1, 2, batch, d)
        states = both.unbind(0)  # views, unbound once: indexing in the loop costs a call each
        transitions = torch.stack([forward_steps, backward_steps.flip(0)], dim=1).unbind(0)
        for i in range(1, steps + 1):
            states[i].baddbmm_(states[i - 1], transitions[i - 1])
        return both[:, 0], both[:, 1].flip(0)
    states, transitions = forward.unbind(0), forward_steps.unbind(0)
    for i in range(1, steps + 1):
        states[i].addmm_(states[i - 1], transitions[i - 1])
    states, transitions = backward.unbind(0), backward_steps.unbind(0)
    for i in range(steps - 1, -1, -1):
        states[i].addmm_(states[i + 1], transitions[i])
    return forward, backward


def padded_dense(D, A, B, C, E, F, G):
    """The padded ``W``, shape ``(K * mb, K * nb)``, from the padded stacks; differentiable.

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
