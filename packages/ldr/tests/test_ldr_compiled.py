"""The compiled inference kernels (numba, the ``fast`` extra): ``W`` against the dense Krylov
reference, when the layer uses them, and the torch kernels in their place without numba."""

import copy

import pytest
import torch

from structurednets_ldr import LDRLayer, bands_to_dense
from structurednets_ldr.kernels import compiled
from structurednets_ldr.schedule import compiled_chain_length

needs_numba = pytest.mark.skipif(
    not compiled.AVAILABLE, reason="numba is not installed (pip install structurednets-ldr[fast])"
)


@needs_numba
@pytest.mark.parametrize(
    "out_dim, in_dim, nb_columns, chain",
    [
        (1, 1, 1, 1),
        (2, 3, 2, 2),
        (3, 5, 3, 2),  # periodic neighbours coincide or wrap at once
        (9, 11, 9, 2),  # a cut last chain
        (12, 10, 10, 10),  # one chain: Horner alone
        (16, 24, 16, 1),  # no Horner step: W = S_A S_B^T
        (30, 30, 30, 7),
        (25, 18, 18, None),  # the cost model's chain length
        (17, 17, 30, 4),  # more Krylov columns than rows
    ],
)
def test_compiled_weight_matches_the_dense_reference(
    out_dim, in_dim, nb_columns, chain, random_operators, reference_weight
):
    A_bands, B_bands, G, H = random_operators(out_dim, in_dim, 3, seed=out_dim + in_dim)
    expected = reference_weight(bands_to_dense(A_bands), bands_to_dense(B_bands), G, H, nb_columns)
    scale = expected.abs().max()
    chain = chain or compiled_chain_length(out_dim, in_dim, nb_columns, 3)
    W = compiled.weight(A_bands, B_bands, G, H, nb_columns, chain)
    torch.testing.assert_close(W, expected, rtol=0, atol=1e-12 * scale)
    single = [t.float() for t in (A_bands, B_bands, G, H)]
    W32 = compiled.weight(*single, nb_columns, chain)
    assert W32.dtype == torch.float32
    torch.testing.assert_close(W32.double(), expected, rtol=0, atol=1e-5 * scale)


def test_chain_length_balances_the_product_and_the_horner_steps():
    # longer chains for more columns and generators, about sqrt(5.5 m r / 50)
    assert compiled_chain_length(128, 128, 128, 3) < compiled_chain_length(1024, 1024, 1024, 8)
    assert 3 <= compiled_chain_length(128, 128, 128, 3) <= 10
    assert compiled_chain_length(8, 8, 1, 1) == 1


@pytest.fixture
def calls(monkeypatch):
    """The number of calls of the compiled ``weight``."""
    counted = []
    original = compiled.weight

    def counting(*args, **kwargs):
        counted.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(compiled, "weight", counting)
    return counted


@needs_numba
def test_inference_runs_the_compiled_kernels_and_training_does_not(calls):
    torch.manual_seed(0)
    layer = LDRLayer(48, 40, 0.5)
    U = torch.randn(64, 48)  # a batch large enough for the explicit form
    with torch.no_grad():
        inference = layer(U)
        dense = layer.to_dense()
    assert len(calls) == 2
    training = layer(U)
    training.sum().backward()
    assert len(calls) == 2
    torch.testing.assert_close(inference, training.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense, layer.to_dense().detach(), rtol=1e-5, atol=1e-5)


@needs_numba
def test_other_dtypes_run_the_torch_kernels(calls):
    torch.manual_seed(0)
    layer = LDRLayer(40, 30, 0.5)
    U = torch.randn(64, 40)
    with torch.no_grad():
        compiled_output = layer(U)
        half = copy.deepcopy(layer).to(torch.bfloat16)(U.bfloat16())
    assert len(calls) == 1  # bfloat16: torch kernels
    torch.testing.assert_close(half.float(), compiled_output, rtol=0.05, atol=0.05)


def test_without_numba_inference_runs_the_torch_kernels(calls, monkeypatch, reference_weight):
    """The pure-torch path (numba not installed, or hidden here): no compiled call, and
    inference equals the dense Krylov reference."""
    monkeypatch.setattr(compiled, "AVAILABLE", False)
    torch.manual_seed(0)
    layer = LDRLayer(40, 30, 0.5).double()
    U = torch.randn(64, 40, dtype=torch.float64)
    with torch.no_grad():
        output = layer(U) - layer.bias
        dense = layer.to_dense()
        A, B = layer.operators
        expected = reference_weight(A, B, layer.G, layer.H, layer.krylov_columns)
    assert not calls
    scale = expected.abs().max()
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(output, U @ expected.T, rtol=0, atol=1e-11 * scale)
