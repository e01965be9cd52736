import pytest
import torch

from structurednets.numerics import torch_threads


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run the suite on one thread: the LDR kernels are chains of small operations, which
    multi-threaded BLAS makes much slower on a shared, busy machine."""
    with torch_threads(1):
        yield


def _krylov(matrix, vectors, nb_columns):
    """``[v, M v, M^2 v, ...]`` column by column, ``(n, m, r)``."""
    columns = [vectors]
    for _ in range(nb_columns - 1):
        columns.append(matrix @ columns[-1])
    return torch.stack(columns, dim=1)


def _reference_weight(A, B, G, H, nb_columns):
    """``sum_i K(A, g_i) K(B^T, h_i)^T`` from dense operators, Krylov matrices formed."""
    K_A = _krylov(A, G, nb_columns)
    K_B = _krylov(B.T, H, nb_columns)
    return torch.einsum("akr,bkr->ab", K_A, K_B)


def _random_operators(out_dim, in_dim, rank, seed, scale=0.4):
    """Random float64 ``(A_bands, B_bands, G, H)``: bands of operators that are not shifts."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return (
        normal(3, out_dim) * scale,
        normal(3, in_dim) * scale,
        normal(out_dim, rank),
        normal(in_dim, rank),
    )


@pytest.fixture
def reference_weight():
    """The independent reference ``W(A, B, G, H, m)``: dense operators, Krylov matrices."""
    return _reference_weight


@pytest.fixture
def random_operators():
    """``random_operators(out_dim, in_dim, rank, seed)``: random bands and generators."""
    return _random_operators
