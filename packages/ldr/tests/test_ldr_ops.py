"""The custom operators: schema, fake (meta) shapes, autograd registration, dynamic shapes
(``torch.library.opcheck``), the scratch buffers, threads, and the schedule tables."""

import threading

import pytest
import torch

from structurednets_ldr import LDRLayer
from structurednets_ldr.kernels import scratch
from structurednets_ldr.schedule import choose_schedule, schedule_table


@pytest.mark.slow  # opcheck traces the operators as torch.compile does
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize(
    "out_dim, in_dim, nb_columns, chain_length",
    [(9, 11, 9, 2), (12, 10, 10, 10), (16, 24, 16, 3)],  # cut chain, one chain, several
)
def test_opcheck(keep, out_dim, in_dim, nb_columns, chain_length, random_operators):
    U = torch.randn(4, in_dim, dtype=torch.float64).requires_grad_(True)
    A_bands, B_bands, G, H = (
        t.requires_grad_(True) for t in random_operators(out_dim, in_dim, 2, seed=0)
    )
    sizes = (nb_columns, chain_length, keep)
    ops = torch.ops.structurednets_ldr
    torch.library.opcheck(ops.weight, (A_bands, B_bands, G, H, *sizes))
    torch.library.opcheck(ops.product, (U, A_bands, B_bands, G, H, *sizes))
    with torch.no_grad():
        W, starts, W0 = ops.weight(A_bands, B_bands, G, H, nb_columns, chain_length, True)
        Y, *residuals = ops.product(U, A_bands, B_bands, G, H, nb_columns, chain_length, True)
    detached = [t.detach() for t in (U, A_bands, B_bands)]
    torch.library.opcheck(
        ops.weight_backward,
        (torch.randn_like(W), *detached[1:], starts, W0, nb_columns, chain_length),
    )
    torch.library.opcheck(
        ops.product_backward,
        (torch.randn_like(Y), *detached, *residuals, nb_columns, chain_length, True),
    )


@pytest.fixture
def every_tensor_through_scratch(monkeypatch):
    """Small layers too: the scratch buffers are otherwise used only from 1 MiB on."""
    monkeypatch.setattr(scratch, "_MIN_NUMEL", 0)
    yield
    scratch.release_scratch()


def layer_gradients(layer, U):
    U = U.clone().requires_grad_(True)
    (layer(U) ** 2).sum().backward()
    gradients = [U.grad, *(p.grad.clone() for p in layer.parameters())]
    layer.zero_grad()
    return gradients


@pytest.mark.parametrize("batch", [3, 200])  # factored and explicit
def test_scratch_buffers_give_the_same_results(every_tensor_through_scratch, batch, monkeypatch):
    torch.manual_seed(0)
    layer = LDRLayer(40, 30, 0.6)
    layer.double()
    U = torch.randn(batch, 40, dtype=torch.float64)
    with_scratch = layer_gradients(layer, U)
    with torch.no_grad():
        forward = layer(U)
    monkeypatch.setattr(scratch, "_MIN_NUMEL", 1 << 62)
    without = layer_gradients(layer, U)
    with torch.no_grad():
        torch.testing.assert_close(forward, layer(U), rtol=1e-13, atol=1e-13)
    for got, want in zip(with_scratch, without, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_threads_have_their_own_scratch(every_tensor_through_scratch):
    """Two threads training two layers at once get what each gets alone."""
    torch.manual_seed(0)
    layers = [LDRLayer(48, 40, 0.5).double() for _ in range(2)]
    inputs = [torch.randn(100, 48, dtype=torch.float64) for _ in range(2)]
    alone = [layer_gradients(layer, U) for layer, U in zip(layers, inputs, strict=True)]
    together = [None, None]

    def run(index):
        for _ in range(20):
            together[index] = layer_gradients(layers[index], inputs[index])

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(together, alone, strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("sizes", [(512, 512, 512, 4), (128, 128, 128, 3), (40, 30, 30, 2)])
def test_schedule_table_agrees_with_the_cost_model(sizes, training):
    table = schedule_table(*sizes, training)
    assert table[-1][0] is None
    for batch in [*range(1, 400), 1000, 10**6]:
        schedule = next((e, b) for below, e, b in table if below is None or batch < below)
        assert schedule == choose_schedule(*sizes, batch, training=training)


def test_inference_uses_its_own_schedule_with_the_same_result():
    """Without gradients longer chains pay off (no backward pass repeats the steps)."""
    torch.manual_seed(0)
    layer = LDRLayer(128, 128, 0.1).double()
    assert layer._schedule_for(256, True) != layer._schedule_for(256, False)
    U = torch.randn(256, 128, dtype=torch.float64)
    with torch.no_grad():
        inference = layer(U)
    torch.testing.assert_close(layer(U).detach(), inference, rtol=1e-12, atol=1e-12)
