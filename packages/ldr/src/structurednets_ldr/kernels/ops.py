"""The LDR products as ``torch.library`` custom operators, and the functions that call them.

``torch.compile`` sees each product as one opaque operator (``structurednets_ldr::weight``
builds ``W``, ``structurednets_ldr::product`` applies the factored form), with a shape function
for fake and meta tensors and a backward that is another opaque operator; none of the
Python loops, schedules and in-place kernels of :mod:`structurednets_ldr.kernels.forms` is traced, so
there are no graph breaks. Everything an operator needs besides tensors is an integer: the
number of Krylov columns ``m`` and the chain length ``b``, chosen before the call from the
shapes alone.

The forward operators return, besides their result, what their backward needs (the chain
starts, and ``W_0`` or the intermediates of the factored form) when ``keep`` is true, i.e.
when a gradient is wanted; these are fresh tensors owned by the autograd graph, freed with
it. (Without them a backward pass recomputes them.) The kernels run in the
dtype of their inputs, with autocast off (the layer casts its input to the parameters'
dtype).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from structurednets_ldr.kernels import compiled
from structurednets_ldr.kernels.forms import (
    chain_geometry,
    explicit_backward,
    explicit_forward,
    factored_backward,
    factored_forward,
)
from structurednets_ldr.kernels.krylov import even_chains, starts_shape
from structurednets_ldr.schedule import choose_schedule, compiled_chain_length

__all__ = ["multiply", "weight"]


def _without_autocast(tensor: Tensor) -> contextlib.AbstractContextManager:
    device = tensor.device.type
    if torch.amp.is_autocast_available(device):
        return torch.amp.autocast(device, enabled=False)
    return contextlib.nullcontext()


# -- explicit W ----------------------------------------------------------------------------


@torch.library.custom_op("structurednets_ldr::weight", mutates_args=())
def _weight(
    A_bands: Tensor,
    B_bands: Tensor,
    G: Tensor,
    H: Tensor,
    nb_columns: int,
    chain_length: int,
    keep: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if not keep and compiled.supports(G):  # no backward pass to feed: the compiled kernels
        out_dim, in_dim, rank = A_bands.shape[1], B_bands.shape[1], G.shape[1]
        chain = compiled_chain_length(out_dim, in_dim, nb_columns, rank)
        W = compiled.weight(A_bands, B_bands, G, H, nb_columns, chain)
        return W, G.new_empty(0), G.new_empty(0)
    chain = chain_geometry(A_bands.shape[1], B_bands.shape[1], nb_columns, chain_length, G.shape[1])
    with _without_autocast(A_bands):
        return explicit_forward(A_bands, B_bands, G, H, chain, keep)


@_weight.register_fake
def _weight_fake(A_bands, B_bands, G, H, nb_columns, chain_length, keep):
    out_dim, in_dim, rank = A_bands.shape[1], B_bands.shape[1], G.shape[1]
    W = G.new_empty(out_dim, in_dim)
    if not keep:
        return W, G.new_empty(0), G.new_empty(0)
    b, _ = even_chains(nb_columns, chain_length)
    return (
        W,
        G.new_empty(starts_shape(out_dim, in_dim, rank, nb_columns, b)),
        G.new_empty(out_dim, in_dim) if b > 1 else G.new_empty(0),
    )


@torch.library.custom_op("structurednets_ldr::weight_backward", mutates_args=())
def _weight_backward(
    dW: Tensor,
    A_bands: Tensor,
    B_bands: Tensor,
    starts: Tensor,
    W0: Tensor,
    nb_columns: int,
    chain_length: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    chain = chain_geometry(
        A_bands.shape[1], B_bands.shape[1], nb_columns, chain_length, starts.shape[1]
    )
    with _without_autocast(dW):
        return explicit_backward(dW, A_bands, B_bands, starts, W0, chain)


@_weight_backward.register_fake
def _weight_backward_fake(dW, A_bands, B_bands, starts, W0, nb_columns, chain_length):
    rank = starts.shape[1]
    return (
        torch.empty_like(A_bands),
        torch.empty_like(B_bands),
        A_bands.new_empty(A_bands.shape[1], rank),
        B_bands.new_empty(B_bands.shape[1], rank),
    )


def _weight_setup_context(ctx, inputs, output):
    A_bands, B_bands, G, H, nb_columns, chain_length, keep = inputs
    _, starts, W0 = output
    ctx.mark_non_differentiable(starts, W0)
    ctx.set_materialize_grads(False)  # no zero-filled "gradients" of the residuals
    ctx.save_for_backward(A_bands, B_bands, starts, W0, *(() if keep else (G, H)))
    ctx.sizes = (nb_columns, chain_length)
    ctx.keep = keep


def _weight_gradient(ctx, dW, _starts, _W0):
    if dW is None:  # W did not reach the loss
        return (None,) * 7
    A_bands, B_bands, starts, W0, *generators = ctx.saved_tensors
    if not ctx.keep:  # called without residuals: recompute them
        _, starts, W0 = torch.ops.structurednets_ldr.weight(
            A_bands, B_bands, *generators, *ctx.sizes, True
        )
    gradients = torch.ops.structurednets_ldr.weight_backward(
        dW, A_bands, B_bands, starts, W0, *ctx.sizes
    )
    return (*gradients, None, None, None)


_weight.register_autograd(_weight_gradient, setup_context=_weight_setup_context)


# -- factored product ----------------------------------------------------------------------


@torch.library.custom_op("structurednets_ldr::product", mutates_args=())
def _product(
    U: Tensor,
    A_bands: Tensor,
    B_bands: Tensor,
    G: Tensor,
    H: Tensor,
    nb_columns: int,
    chain_length: int,
    keep: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    chain = chain_geometry(A_bands.shape[1], B_bands.shape[1], nb_columns, chain_length, G.shape[1])
    with _without_autocast(U):
        return factored_forward(U, A_bands, B_bands, G, H, chain, keep)


@_product.register_fake
def _product_fake(U, A_bands, B_bands, G, H, nb_columns, chain_length, keep):
    out_dim, in_dim, rank, batch = A_bands.shape[1], B_bands.shape[1], G.shape[1], U.shape[0]
    Y = U.new_empty(batch, out_dim)
    if not keep:
        return Y, *(U.new_empty(0) for _ in range(4))
    b, nb_chains = even_chains(nb_columns, chain_length)
    return (
        Y,
        U.new_empty(starts_shape(out_dim, in_dim, rank, nb_columns, b)),
        U.new_empty(in_dim, b, batch),
        U.new_empty(nb_chains * rank, b, batch),
        U.new_empty(out_dim, b, batch),
    )


@torch.library.custom_op("structurednets_ldr::product_backward", mutates_args=())
def _product_backward(
    dY: Tensor,
    U: Tensor,
    A_bands: Tensor,
    B_bands: Tensor,
    starts: Tensor,
    V: Tensor,
    Z: Tensor,
    Q: Tensor,
    nb_columns: int,
    chain_length: int,
    input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    chain = chain_geometry(
        A_bands.shape[1], B_bands.shape[1], nb_columns, chain_length, starts.shape[1]
    )
    with _without_autocast(dY):
        return factored_backward(dY, U, A_bands, B_bands, starts, V, Z, Q, chain, input_grad)


@_product_backward.register_fake
def _product_backward_fake(
    dY, U, A_bands, B_bands, starts, V, Z, Q, nb_columns, chain_length, input_grad
):
    rank = starts.shape[1]
    return (
        torch.empty_like(U) if input_grad else U.new_empty(0),
        torch.empty_like(A_bands),
        torch.empty_like(B_bands),
        A_bands.new_empty(A_bands.shape[1], rank),
        B_bands.new_empty(B_bands.shape[1], rank),
    )


def _product_setup_context(ctx, inputs, output):
    U, A_bands, B_bands, G, H, nb_columns, chain_length, keep = inputs
    _, starts, V, Z, Q = output
    ctx.mark_non_differentiable(starts, V, Z, Q)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(U, A_bands, B_bands, starts, V, Z, Q, *(() if keep else (G, H)))
    ctx.sizes = (nb_columns, chain_length)
    ctx.keep = keep


def _product_gradient(ctx, dY, *_residuals):
    if dY is None:
        return (None,) * 8
    U, A_bands, B_bands, starts, V, Z, Q, *generators = ctx.saved_tensors
    if not ctx.keep:  # called without residuals: recompute them
        _, starts, V, Z, Q = torch.ops.structurednets_ldr.product(
            U, A_bands, B_bands, *generators, *ctx.sizes, True
        )
    input_grad = ctx.needs_input_grad[0]
    dU, *gradients = torch.ops.structurednets_ldr.product_backward(
        dY, U, A_bands, B_bands, starts, V, Z, Q, *ctx.sizes, input_grad
    )
    return (dU if input_grad else None, *gradients, None, None, None)


_product.register_autograd(_product_gradient, setup_context=_product_setup_context)


# -- calling them --------------------------------------------------------------------------


def _wants_gradient(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def weight(
    A_bands: Tensor,
    B_bands: Tensor,
    G: Tensor,
    H: Tensor,
    nb_columns: int,
    chain_length: int | None = None,
) -> Tensor:
    """``W = sum_(k<m) A^k G H^T B^k`` ``(out, in)`` with ``m = nb_columns`` Krylov columns,
    i.e. ``sum_i K(A, g_i) K(B^T, h_i)^T``; differentiable (once).

    ``A_bands`` ``(3, out)``, ``B_bands`` ``(3, in)`` (see :mod:`structurednets_ldr.operators`),
    ``G`` ``(out, r)``, ``H`` ``(in, r)``. ``chain_length``: ``b`` of the Horner evaluation
    (default: the cost model's, :func:`~structurednets_ldr.schedule.choose_schedule`).
    """
    keep = _wants_gradient(A_bands, B_bands, G, H)
    if chain_length is None:
        sizes = (A_bands.shape[1], B_bands.shape[1], nb_columns, G.shape[1])
        chain_length = choose_schedule(*sizes, None, training=keep)[1]
    return torch.ops.structurednets_ldr.weight(
        A_bands, B_bands, G, H, nb_columns, chain_length, keep
    )[0]


def multiply(
    U: Tensor,
    A_bands: Tensor,
    B_bands: Tensor,
    G: Tensor,
    H: Tensor,
    nb_columns: int,
    chain_length: int | None = None,
    explicit: bool | None = None,
) -> Tensor:
    """``U W^T`` ``(batch, out)`` for ``U`` ``(batch, in)`` and :func:`weight`'s ``W``;
    differentiable (once).

    ``explicit``: with the explicit ``W`` (``True``) or in factored form (``False``);
    ``chain_length``: ``b``. Those not given are the cost model's choice for the batch size
    (:func:`~structurednets_ldr.schedule.choose_schedule`).
    """
    keep = _wants_gradient(U, A_bands, B_bands, G, H)
    if explicit is None or chain_length is None:
        sizes = (A_bands.shape[1], B_bands.shape[1], nb_columns, G.shape[1])
        explicit, chain_length = choose_schedule(
            *sizes, U.shape[0], explicit=explicit, chain_length=chain_length, training=keep
        )
    if explicit:
        return U @ weight(A_bands, B_bands, G, H, nb_columns, chain_length).T
    return torch.ops.structurednets_ldr.product(
        U, A_bands, B_bands, G, H, nb_columns, chain_length, keep
    )[0]
