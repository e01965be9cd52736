"""Generated low-displacement-rank targets the fit tests share (a helper, not a test module)."""

import torch

from structurednets_ldr import cyclic_shift_bands, weight


def generated(n, rank, noise, seed, out_dim=None, operators=False):
    """An LDR matrix from cyclic-shift operators (``A = Z_1``, ``B = Z_(-1)^T``) whose
    nonzeros are perturbed by ``noise`` standard normal, and random generators (and the
    operators' bands, if ``operators``)."""
    out_dim = out_dim or n
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    A = cyclic_shift_bands(out_dim, 1.0, dtype=torch.float64) + noise * normal(3, out_dim)
    B = cyclic_shift_bands(n, -1.0, down=False, dtype=torch.float64) + noise * normal(3, n)
    G, H = normal(out_dim, rank), normal(n, rank)
    W = weight(A, B, G, H, min(out_dim, n), 4).detach()
    return (W, A, B) if operators else W
