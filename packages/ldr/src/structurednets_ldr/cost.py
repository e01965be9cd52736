"""Multiply-adds of the LDR kernels, counted from the sizes and the schedule alone.

:func:`ldr_cost` counts what :mod:`structurednets_ldr.kernels.forms` does for a training
call (forward, then backward with the input's gradient) with the schedule the layer takes
for that batch size (:func:`~structurednets_ldr.schedule.schedule_table`): every
multiply-add of the matrix and batched products (``mm``, ``addmm``, ``bmm``, the
``einsum`` of the band gradients, their padding zeros included) and of the elementwise
steps (one per entry of a ``mul`` or ``addcmul``: the three-band stencils, the powers of
``T = diag(A, B^T)`` and their adjoint). Plain additions, copies, gathers and scatters are
not counted.
"""

from __future__ import annotations

from structurednets.cost import DEFAULT_COST_BATCH_SIZE, Cost, dense_cost
from structurednets_ldr.kernels.krylov import default_chunk_size, even_chains
from structurednets_ldr.schedule import schedule_for, schedule_table

__all__ = ["band_dots_cost", "cost_ratio", "ldr_cost", "rank_within_cost", "schedule_cost"]


def band_dots_cost(n: int, width: int, chunk: int = 16) -> int:
    """Multiply-adds of ``band_dots(left, right)`` for ``(n, width)`` operands: chunks of
    ``s`` rows against ``s + 2`` rows in one ``bmm``, the other rows against three each."""
    size = min(chunk, n - 2)
    nb_chunks = (n - 2) // size if size > 0 else 0
    covered = nb_chunks * size
    boundary = len({0, n - 1, *range(1 + covered, n - 1)})
    return nb_chunks * size * (size + 2) * width + 3 * boundary * width


class _Sizes:
    """The shapes a schedule works on: chains, chunks and windows of the chain starts."""

    def __init__(self, out_dim: int, in_dim: int, nb_columns: int, rank: int, chain: int):
        self.o, self.i, self.r = out_dim, in_dim, rank
        self.b, self.M = even_chains(nb_columns, chain)
        q = int(default_chunk_size(self.b, max(out_dim, in_dim), rank))
        self.chunks = -(-out_dim // q) + -(-in_dim // q)
        self.q, self.w = q, q + 2 * self.b
        self.cut = self.M * self.b != nb_columns

    @property
    def powers(self) -> int:
        """The recursion for the chunks of ``T^b``: three per entry and step."""
        return 3 * self.b * self.chunks * self.q * self.w

    def starts_forward(self) -> int:
        """Chain starts: the powers and ``M - 1`` coarse ``bmm`` steps."""
        if self.M == 1:
            return 0
        return self.powers + (self.M - 1) * self.chunks * self.r * self.w * self.q

    def starts_backward(self) -> int:
        """Adjoint of the chain starts: the powers again, ``M - 1`` adjoint steps and the
        gradient of ``P``, the powers' adjoint (``b - 1`` steps) and their band products."""
        if self.M == 1:
            return 0
        block = self.chunks * self.q * self.w
        steps = (self.M - 1) * self.r * block
        gradient_P = (self.M - 1) * self.r * block
        adjoint = 3 * (self.b - 1) * block + 3 * self.b * block
        return self.powers + steps + gradient_P + adjoint


def schedule_cost(
    out_dim: int,
    in_dim: int,
    nb_columns: int,
    rank: int,
    batch_size: int,
    explicit: bool,
    chain_length: int,
) -> Cost:
    """Multiply-adds of one training call with this schedule (``explicit`` form or factored,
    chains of ``chain_length``): forward, and backward with the input's gradient."""
    s = _Sizes(out_dim, in_dim, nb_columns, rank, chain_length)
    o, i, r, b, M, batch = s.o, s.i, s.r, s.b, s.M, batch_size
    if explicit:
        area = o * i
        horner = 6 * (b - 1) * area
        forward = s.starts_forward() + M * r * area + horner + batch * area
        backward = 2 * batch * area + 2 * M * r * area + s.starts_backward()
        if b > 1:
            cut = (M - 1) * r
            remove_cut = (M * r - cut) * area if s.cut else 0
            recomputed = 6 * (b - 2) * area
            steps = (b - 1) * (9 * area + band_dots_cost(i, o) + band_dots_cost(o, i))
            backward += remove_cut + recomputed + steps
        return Cost(forward, backward)
    columns = M * r * b * batch
    stencils = 3 * (b - 1) * (o + i) * batch
    forward = s.starts_forward() + stencils + columns * (i + o)
    bands = band_dots_cost(o, (b - 1) * batch) + band_dots_cost(i, (b - 1) * batch)
    backward = stencils + 2 * columns * (o + i) + bands + s.starts_backward()
    return Cost(forward, backward)


def ldr_cost(out_dim: int, in_dim: int, nb_columns: int, rank: int, batch_size: int) -> Cost:
    """Multiply-adds of an LDR layer's training call for ``batch_size`` inputs, with the
    schedule the layer takes for it (:func:`schedule_cost`)."""
    table = schedule_table(out_dim, in_dim, nb_columns, rank, True)
    explicit, chain_length = schedule_for(table, batch_size)
    return schedule_cost(out_dim, in_dim, nb_columns, rank, batch_size, explicit, chain_length)


def cost_ratio(out_dim: int, in_dim: int, nb_columns: int, rank: int) -> float:
    """:func:`ldr_cost` at the default batch size (256) against ``nn.Linear``'s."""
    batch = DEFAULT_COST_BATCH_SIZE
    cost = ldr_cost(out_dim, in_dim, nb_columns, rank, batch)
    return cost.ratio(dense_cost(in_dim, out_dim, batch))


def rank_within_cost(
    out_dim: int, in_dim: int, nb_columns: int, largest_rank: int, max_cost_ratio: float | None
) -> int:
    """The largest displacement rank ``<= largest_rank`` whose :func:`cost_ratio` is at most
    ``max_cost_ratio`` (``largest_rank`` if that is ``None``).

    Raises ValueError naming the smallest ratio of ranks ``1 .. largest_rank`` if none is.
    """
    if max_cost_ratio is None:
        return largest_rank
    if isinstance(max_cost_ratio, bool) or not isinstance(max_cost_ratio, (int, float)):
        raise TypeError(f"max_cost_ratio must be a number or None, got {max_cost_ratio!r}")
    if not max_cost_ratio > 0:
        raise ValueError(f"max_cost_ratio must be positive, got {max_cost_ratio!r}")
    ratios = {r: cost_ratio(out_dim, in_dim, nb_columns, r) for r in range(largest_rank, 0, -1)}
    for rank, ratio in ratios.items():
        if ratio <= max_cost_ratio:
            return rank
    raise ValueError(
        f"max_cost_ratio={max_cost_ratio!r} is below every LDR layout of {out_dim} x {in_dim} "
        f"with {nb_columns} Krylov columns and displacement rank <= {largest_rank}: the "
        f"smallest achievable cost ratio is {min(ratios.values()):.3g}"
    )
