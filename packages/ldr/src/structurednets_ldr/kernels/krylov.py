"""Chain starts of Krylov sequences of tridiagonal-plus-corner operators.

An LDR matrix ``W = sum_(k<m) A^k G H^T B^k`` never needs its Krylov matrices: cutting
``k = J b + l`` (``J < M`` chains of ``b`` columns) gives

    ``W = sum_(l<b) A^l W_0 B^l``,  ``W_0 = S_A S_B^T``,

where ``S_A = [G, A^b G, A^(2b) G, ...]`` (``out x M r``) and ``S_B = [H, (B^T)^b H, ...]``
(``in x M r``) are the *chain starts*. This module computes the chain starts of the stacked
operator ``T = diag(A, B^T)`` in ``M - 1`` *coarse* steps with ``P = T^b`` and runs their
adjoint; :mod:`structurednets_ldr.kernels.forms` does the rest with ``b`` Horner steps.

``P`` is banded (bandwidth ``b``) and kept in *row chunks*: chunk ``c`` holds ``q``
consecutive rows of one diagonal block and the window of ``w = q + 2 b`` columns around
them. The chunks come out of ``b`` steps of a small recursion on ``(chunks, w, q)`` arrays
(``T^T`` applied to the unit vectors of the chunk's rows inside the window, which a walk of
``b`` steps never leaves, so it is exact even where a window wraps around a small periodic
block); its adjoint is :func:`power_chunks_backward`. A coarse step is one batched product of
``(r x w)`` by ``(w x q)`` blocks (faster than ``(q x w)`` by ``(w x r)`` for small ``r``),
with the state in the layout ``(chunks, r, q)``: one ``index_select`` gathers the windows
and ``bmm(out=)`` writes the next chain's starts in place, two operations per step, which is
what counts at small sizes (Python and dispatch, not arithmetic). The adjoint steps are one
``bmm`` and one ``scatter_add_`` each, straight in the layout ``(r, rows)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from structurednets_ldr.kernels.scratch import scratch
from structurednets_ldr.operators import transpose_bands

__all__ = [
    "ChainGeometry",
    "chain_starts_backward",
    "coarse_state",
    "combined_coefficients",
    "combined_coefficients_backward",
    "default_chunk_size",
    "even_chains",
    "make_chain_geometry",
    "power_chunks",
    "power_chunks_backward",
    "power_steps",
    "starts_shape",
]


@dataclass
class _Indices:
    """Index tensors of a chain geometry on one device."""

    chunk_rows: torch.Tensor  # (N,) chunk-layout row of every real row
    nb_minus: torch.Tensor  # (N,) real row of the periodic neighbour i - 1
    nb_plus: torch.Tensor  # (N,) real row of the periodic neighbour i + 1
    window_rows: torch.Tensor  # (chunks * w,) chunk-layout row of every window slot
    window_real: torch.Tensor  # (chunks, w) real row of every window slot
    unit: torch.Tensor  # (chunks, w, q) float32: 1 where slot b + li holds real row li


@dataclass(frozen=True, eq=False)
class ChainGeometry:
    """How the chain starts of a block-diagonal tridiagonal-plus-corner operator are built.

    Rows live in a *chunk layout*: every block is padded with zero rows to a multiple of the
    chunk size ``q``, blocks one after the other, so the rows of block ``k`` are the range
    :meth:`rows`.

    Attributes:
        block_sizes: sizes of the diagonal blocks (each periodic on its own), e.g.
            ``(output_dim, input_dim)`` for ``diag(A, B^T)``.
        nb_columns: ``m``, the number of Krylov columns.
        chain_length: ``b``; the last chain is cut to ``m - (M - 1) b`` columns.
        nb_chains: ``M = ceil(m / b)``.
        chunk_size: ``q``, rows per chunk of ``P``.
    """

    block_sizes: tuple[int, ...]
    nb_columns: int
    chain_length: int
    nb_chains: int
    chunk_size: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def block_chunks(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / self.chunk_size) for n in self.block_sizes)

    @property
    def nb_chunks(self) -> int:
        return sum(self.block_chunks)

    @property
    def nb_chunk_rows(self) -> int:
        """Rows of the chunk layout, padding included."""
        return self.nb_chunks * self.chunk_size

    @property
    def window(self) -> int:
        """``w = q + 2 b``: columns of a chunk's window."""
        return self.chunk_size + 2 * self.chain_length

    @property
    def last_chain_length(self) -> int:
        return self.nb_columns - (self.nb_chains - 1) * self.chain_length

    def rows(self, block: int) -> slice:
        """The chunk-layout rows of the real rows of ``block``."""
        start = sum(self.block_chunks[:block]) * self.chunk_size
        return slice(start, start + self.block_sizes[block])

    def cached(self, key: tuple, make):
        """``make()``, computed once per ``key`` and kept with the geometry (index tensors per
        device, and the like)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def indices(self, device: torch.device) -> _Indices:
        return self.cached((str(device),), lambda: _build_indices(self, torch.device(device)))

    def window_gather(self, device: torch.device, rank: int) -> torch.Tensor:
        """``(chunks * r * w,)`` flat indices into a state of layout ``(chunks, r, q)`` that
        gather its windows ``(chunks, r, w)`` in one ``index_select``."""

        def make():
            q, w = self.chunk_size, self.window
            rows = self.indices(device).window_rows.view(self.nb_chunks, 1, w)
            generators = torch.arange(rank, device=rows.device).view(1, rank, 1)
            return ((rows // q * rank + generators) * q + rows % q).reshape(-1)

        return self.cached((str(device), "gather", rank), make)

    def window_scatter(self, device: torch.device, rank: int) -> torch.Tensor:
        """``(chunks * r * w,)`` flat indices into a state of layout ``(r, rows)`` of the
        window slots ``(chunks, r, w)`` (the adjoint of :meth:`window_gather`'s gather)."""

        def make():
            rows = self.indices(device).window_rows.view(self.nb_chunks, 1, self.window)
            generators = torch.arange(rank, device=rows.device).view(1, rank, 1)
            return (generators * self.nb_chunk_rows + rows).reshape(-1)

        return self.cached((str(device), "scatter", rank), make)


def make_chain_geometry(
    block_sizes: tuple[int, ...],
    nb_columns: int,
    chain_length: int,
    chunk_size: int | None = None,
    rank: int = 1,
) -> ChainGeometry:
    """A :class:`ChainGeometry`; the chain length is evened out so that ``M b - m < M``; the
    default chunk size depends on the number ``rank`` of vectors per block."""
    if nb_columns < 1 or not block_sizes or min(block_sizes) < 1:
        raise ValueError(
            f"need nb_columns >= 1 and block sizes >= 1, got {nb_columns}, {block_sizes}"
        )
    chain_length, nb_chains = even_chains(nb_columns, chain_length)
    if chunk_size is None:
        chunk_size = default_chunk_size(chain_length, max(block_sizes), rank)
    return ChainGeometry(
        tuple(int(n) for n in block_sizes), int(nb_columns), chain_length, nb_chains, chunk_size
    )


def even_chains(nb_columns: int, chain_length: int) -> tuple[int, int]:
    """``(b, M)``: ``M = ceil(m / b)`` chains of the even length ``b = ceil(m / M)``."""
    chain_length = min(max(1, int(chain_length)), nb_columns)
    nb_chains = math.ceil(nb_columns / chain_length)
    return math.ceil(nb_columns / nb_chains), nb_chains


def default_chunk_size(chain_length: int, largest_block, rank: int = 1):
    """``q = max(16, 2 b)``, and at least so large that ``r w q = r (q + 2 b) q >= 400``.

    The coarse steps are ``(r x w) @ (w x q)`` products of ``w = q + 2 b`` columns: ``q``
    about ``2 b`` keeps the zeros of the window few, but for short chains more, smaller
    products cost more than the zeros (measured, one thread: ``q = 16`` to ``24`` are
    equally fast for ``b = 4 .. 10`` at 128 to 512, ``q = 8`` or ``12`` up to 20% slower),
    and with ``r w q < 400`` ``torch.bmm`` on CPU takes a naive loop, several times slower.

    Works on symbolic sizes too (for shape functions under ``torch.compile``).
    """
    q = max(16, 2 * chain_length)
    while rank * q * (q + 2 * chain_length) < 400:
        q += 1
    return torch.sym_min(q, largest_block)


def starts_shape(out_dim, in_dim, rank: int, nb_columns: int, chain_length: int) -> tuple:
    """Shape ``(M, r, rows)`` of the chain starts of ``diag(A, B^T)``, from sizes alone
    (symbolic ones included): the layout of the chain starts saved for the backward
    pass (:func:`coarse_state` transposed to ``(M, r, rows)``)."""
    chain_length, nb_chains = even_chains(nb_columns, chain_length)
    q = default_chunk_size(chain_length, torch.sym_max(out_dim, in_dim), rank)
    return nb_chains, rank, ((out_dim + q - 1) // q + (in_dim + q - 1) // q) * q


def _build_indices(geometry: ChainGeometry, device: torch.device) -> _Indices:
    q, b, w = geometry.chunk_size, geometry.chain_length, geometry.window
    chunk_rows, nb_minus, nb_plus, window_rows, window_real = [], [], [], [], []
    real_start = 0
    for block, (n, chunks) in enumerate(
        zip(geometry.block_sizes, geometry.block_chunks, strict=True)
    ):
        layout_start = geometry.rows(block).start
        local = torch.arange(n)
        chunk_rows.append(layout_start + local)
        nb_minus.append(real_start + (local - 1) % n)
        nb_plus.append(real_start + (local + 1) % n)
        slots = (torch.arange(chunks)[:, None] * q - b + torch.arange(w)) % n
        window_rows.append(layout_start + slots)
        window_real.append(real_start + slots)
        real_start += n
    chunk_rows_t = torch.cat(chunk_rows)
    valid = torch.zeros(geometry.nb_chunk_rows, dtype=torch.bool)
    valid[chunk_rows_t] = True
    unit = torch.zeros(geometry.nb_chunks, w, q, dtype=torch.float32)
    li = torch.arange(q)
    unit[:, li + b, li] = valid.view(geometry.nb_chunks, q).to(torch.float32)
    return _Indices(
        chunk_rows=chunk_rows_t.to(device),
        nb_minus=torch.cat(nb_minus).to(device),
        nb_plus=torch.cat(nb_plus).to(device),
        window_rows=torch.cat(window_rows).reshape(-1).to(device),
        window_real=torch.cat(window_real).to(device),
        unit=unit.to(device),
    )


def combined_coefficients(A_bands: torch.Tensor, B_bands: torch.Tensor) -> torch.Tensor:
    """Bands ``(3, out + in)`` of ``T = diag(A, B^T)``, whose Krylov sequences an LDR matrix
    is made of (``K(A, g)`` and ``K(B^T, h)``)."""
    return torch.cat((A_bands, transpose_bands(B_bands)), dim=1)


def combined_coefficients_backward(
    gradient: torch.Tensor, out_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`combined_coefficients`: gradients of ``A_bands`` and ``B_bands``."""
    of_B_T = gradient[:, out_dim:]
    of_B = torch.stack((of_B_T[2].roll(1, 0), of_B_T[1], of_B_T[0].roll(-1, 0)))
    return gradient[:, :out_dim], of_B


def _power_gather(geometry: ChainGeometry, device: torch.device) -> torch.Tensor:
    """``(3 * chunks * w,)`` flat indices into ``coefficients`` ``(3, N)`` of the bands of
    ``T^T`` at every window slot (see :func:`_power_windows`)."""

    def make():
        idx = geometry.indices(device)
        N = idx.nb_minus.shape[0]
        real = idx.window_real.reshape(-1)
        return torch.cat((2 * N + idx.nb_minus[real], N + real, idx.nb_plus[real]))

    return geometry.cached((str(device), "power_gather"), make)


def _power_windows(coefficients: torch.Tensor, geometry: ChainGeometry) -> torch.Tensor:
    """``(3, chunks, 1, w)``: the bands of ``T^T`` at every window slot."""
    flat = coefficients.reshape(-1).index_select(0, _power_gather(geometry, coefficients.device))
    return flat.view(3, geometry.nb_chunks, 1, geometry.window)


def power_steps(
    coefficients: torch.Tensor, geometry: ChainGeometry, keep: bool = True
) -> torch.Tensor:
    """The recursion that builds :func:`power_chunks`, transposed: ``(b + 1, chunks, q,
    w + 2)``, step ``s`` holding the chunks of ``T^s`` (``[s, c, li, 1 + p]``) and zeros in
    the end slots ``0`` and ``w + 1`` (or only the last step, ``(1, ...)``, unless ``keep``).

    The window slots are the last, contiguous dimension: the shifts of the recursion are
    then offsets along rows of ``w + 2`` numbers, several times faster than along ``q``.
    """
    minus, centre, plus = _power_windows(coefficients, geometry).unbind(0)
    steps = geometry.chain_length + 1 if keep else 2
    shape = (steps, geometry.nb_chunks, geometry.chunk_size, geometry.window + 2)
    powers = scratch("powers", shape, coefficients)
    powers[0].copy_(_padded_unit(geometry, coefficients))
    powers[1:, ..., 0].zero_()
    powers[1:, ..., -1].zero_()
    # every view made once: each slicing is an operation of its own
    middle, left, right = (
        powers[..., 1:-1].unbind(0),
        powers[..., :-2].unbind(0),
        powers[..., 2:].unbind(0),
    )
    for step in range(geometry.chain_length):
        # next[p] = w1[p] power[p] + w0[p] power[p - 1] + w2[p] power[p + 1]
        now, target = step % steps, middle[(step + 1) % steps]
        torch.mul(middle[now], centre, out=target)
        target.addcmul_(left[now], minus)
        target.addcmul_(right[now], plus)
    return powers if keep else powers[geometry.chain_length % 2 :][:1]


def _padded_unit(geometry: ChainGeometry, like: torch.Tensor) -> torch.Tensor:
    """Step 0 of :func:`power_steps`: ``unit`` transposed, with zero end slots."""

    def make():
        unit = geometry.indices(like.device).unit.transpose(1, 2)
        return torch.nn.functional.pad(unit, (1, 1)).to(like.dtype).contiguous()

    return geometry.cached((str(like.device), like.dtype, "padded_unit"), make)


def power_chunks(coefficients: torch.Tensor, geometry: ChainGeometry) -> torch.Tensor | None:
    """Row chunks of ``P = T^b``, transposed: ``(chunks, w, q)``.

    Entry ``[c, p, li]`` is ``P[row li of chunk c, column of window slot p]``. ``None`` with a
    single chain (no coarse steps).
    """
    if geometry.nb_chains == 1:
        return None
    last = power_steps(coefficients, geometry, keep=False)[0]
    return last[..., 1:-1].transpose(1, 2).contiguous()


def power_chunks_backward(
    coefficients: torch.Tensor,
    powers: torch.Tensor,
    gradient: torch.Tensor,
    geometry: ChainGeometry,
) -> torch.Tensor:
    """Gradient ``(3, N)`` of ``coefficients`` from the gradient ``(chunks, w, q)`` of
    :func:`power_chunks`, given the steps ``powers`` of :func:`power_steps` (``keep=True``)."""
    idx = geometry.indices(coefficients.device)
    window = torch.nn.functional.pad(_power_windows(coefficients, geometry), (1, 1))
    b = geometry.chain_length
    # gradients of every step, with zero end slots like the steps themselves
    of_powers = scratch("power_gradients", tuple(powers.shape), coefficients)
    of_powers[..., 0].zero_()
    of_powers[..., -1].zero_()
    of_powers[b, ..., 1:-1] = gradient.transpose(1, 2)
    centre, minus, plus = window[1, ..., 1:-1], window[0, ..., 2:], window[2, ..., :-2]
    for step in range(b, 1, -1):
        # d power[p] = w1[p] g[p] + w0[p + 1] g[p + 1] + w2[p - 1] g[p - 1]
        later = of_powers[step]
        target = of_powers[step - 1, ..., 1:-1]
        torch.mul(later[..., 1:-1], centre, out=target)
        target.addcmul_(later[..., 2:], minus)
        target.addcmul_(later[..., :-2], plus)
    later, earlier = of_powers[1:, ..., 1:-1], powers[:b]
    of_window = torch.stack(
        [(later * earlier[..., shift : shift + geometry.window]).sum((0, 2)) for shift in range(3)]
    )
    of_transposed = coefficients.new_zeros(3, coefficients.shape[1])
    of_transposed.index_add_(1, idx.window_real.reshape(-1), of_window.reshape(3, -1))
    result = torch.zeros_like(coefficients)
    result[2].index_add_(0, idx.nb_minus, of_transposed[0])
    result[1] += of_transposed[1]
    result[0].index_add_(0, idx.nb_plus, of_transposed[2])
    return result


def _state_positions(geometry: ChainGeometry, device: torch.device, rank: int) -> torch.Tensor:
    """``(N * r,)`` flat positions of ``X[i, k]`` in a state of layout ``(chunks, r, q)``."""

    def make():
        rows = geometry.indices(device).chunk_rows[:, None]
        generators = torch.arange(rank, device=rows.device)
        q = geometry.chunk_size
        return ((rows // q * rank + generators) * q + rows % q).reshape(-1)

    return geometry.cached((str(device), "positions", rank), make)


def coarse_state(P: torch.Tensor | None, X: torch.Tensor, geometry: ChainGeometry) -> torch.Tensor:
    """The chain starts in the layout ``(M, chunks, r, q)`` (scratch): ``[J, c, k, li]`` is
    ``(T^(J b) X)[row li of chunk c, k]``, zero in the padding rows."""
    r, q, w, chunks, M = (
        X.shape[1],
        geometry.chunk_size,
        geometry.window,
        geometry.nb_chunks,
        geometry.nb_chains,
    )
    state = scratch("chain_state", (M, chunks, r, q), X)
    flat, blocks = state.view(M, -1).unbind(0), state.unbind(0)
    flat[0].zero_()  # the padding rows; later chains are written whole
    flat[0].index_put_((_state_positions(geometry, X.device, r),), X.reshape(-1))
    if M == 1:
        return state
    # one gather of the windows and one batched product that writes the next state in
    # place: no copies or transposes per step
    window = X.new_empty(chunks, r, w)
    window_flat, gather = window.view(-1), geometry.window_gather(X.device, r)
    for J in range(M - 1):
        torch.index_select(flat[J], 0, gather, out=window_flat)
        torch.bmm(window, P, out=blocks[J + 1])
    return state


def chain_starts_backward(
    P: torch.Tensor | None, starts: torch.Tensor, gradient: torch.Tensor, geometry: ChainGeometry
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``P`` and ``X`` from the gradient ``(M, r, rows)`` of the chain starts.

    ``gradient`` is overwritten. In the transposed layout ``s_(J+1) = s_J P^T``, so the
    adjoint runs ``sigma_J = mu_J + sigma_(J+1) P`` from the last chain back.
    """
    idx = geometry.indices(starts.device)
    M, r, _ = starts.shape
    chunks, q, w = geometry.nb_chunks, geometry.chunk_size, geometry.window
    if P is None:
        return None, gradient[0][:, idx.chunk_rows].T
    P_T = P.transpose(1, 2)
    # one batched product and one scatter_add_ per step, straight in the layout (r, rows)
    blocks = gradient.view(M, r, chunks, q).transpose(1, 2).unbind(0)
    flat = gradient.view(M, -1).unbind(0)
    spread = gradient.new_empty(chunks, r, w)
    spread_flat, scatter_to = spread.view(-1), geometry.window_scatter(starts.device, r)
    for J in range(M - 2, -1, -1):
        torch.bmm(blocks[J + 1], P_T, out=spread)
        flat[J].scatter_add_(0, scatter_to, spread_flat)
    windows = scratch("chain_windows", ((M - 1) * r, chunks * w), starts)
    torch.index_select(starts[: M - 1].view((M - 1) * r, -1), 1, idx.window_rows, out=windows)
    windows = windows.view((M - 1) * r, chunks, w).permute(1, 2, 0)
    later = gradient[1:].view((M - 1) * r, chunks, q).transpose(0, 1)
    return torch.bmm(windows, later), gradient[0][:, idx.chunk_rows].T
