"""The greedy allocation of state dimensions within a budget, from the Hankel spectra."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from structurednets_sss.layout import capped_sizes

__all__ = ["StateAllocation"]


class StateAllocation:
    """Greedy state dimensions: add, one at a time, the state that removes the most squared
    singular value per parameter, while the budget lasts (:meth:`run`).

    A causal state at boundary ``p`` is limited by ``d_{p-1} + n_p`` (what the sweep can
    keep) and by the spectrum's length; singular values below ``tolerance`` are not worth a
    state. Dimensions start from ``starts`` (causal, anticausal); side 0 is causal, 1 anticausal.
    """

    def __init__(
        self,
        spectra: tuple[list[torch.Tensor], list[torch.Tensor]],
        input_sizes: Sequence[int],
        output_sizes: Sequence[int],
        starts: tuple[Sequence[int], Sequence[int]],
        tolerance: float,
    ) -> None:
        self.spectra = spectra
        self.input_sizes, self.output_sizes = input_sizes, output_sizes
        self.dims = (list(starts[0]), list(starts[1]))
        self.tolerance = tolerance
        self.nb_boundaries = len(input_sizes) - 1
        # Entries: (-gain per parameter, side, boundary, dimension it would grow, its cost).
        self.heap: list[tuple[float, int, int, int, int]] = []

    def _neighbours(self, side: int, p: int) -> int:
        d = self.dims[side]
        return (d[p - 1] if p > 0 else 0) + (d[p + 1] if p < self.nb_boundaries - 1 else 0)

    def _cost(self, side: int, p: int) -> int:
        """Parameters one more state at boundary ``p`` costs: its rows of ``B``/``F``, its
        columns of ``C``/``G`` and its entries in the neighbouring transitions."""
        if side == 0:
            own = self.input_sizes[p] + self.output_sizes[p + 1]
        else:
            own = self.input_sizes[p + 1] + self.output_sizes[p]
        return own + self._neighbours(side, p)

    def _limit(self, side: int, p: int) -> int:
        d = self.dims[side]
        if side == 0:
            reachable = (d[p - 1] if p > 0 else 0) + self.input_sizes[p]
        else:
            reachable = (d[p + 1] if p < self.nb_boundaries - 1 else 0) + self.input_sizes[p + 1]
        return min(reachable, self.spectra[side][p].numel())

    def _push(self, side: int, p: int) -> None:
        d = self.dims[side][p]
        if d < self._limit(side, p):
            sigma = float(self.spectra[side][p][d])
            if sigma > self.tolerance:
                cost = self._cost(side, p)
                heapq.heappush(self.heap, (-(sigma**2) / cost, side, p, d, cost))

    def run(self, budget: int) -> tuple[list[int], list[int]]:
        """Grow the states within ``budget``; returns the causal and anticausal dimensions."""
        used = capped_sizes(self.input_sizes, self.output_sizes, *self.dims).nb_weight_parameters
        for p in range(self.nb_boundaries):
            self._push(0, p)
            self._push(1, p)
        while self.heap:
            _, side, p, d, cost = heapq.heappop(self.heap)
            if d != self.dims[side][p]:
                continue  # stale: this state grew since the entry was pushed
            if cost != self._cost(side, p):
                self._push(side, p)  # stale: the neighbours grew, so the state costs more now
                continue
            if used + cost > budget:
                continue
            self.dims[side][p] += 1
            used += cost
            self._push(side, p)
            # A neighbour's limit may have grown with this state.
            for q in (p - 1, p + 1):
                if 0 <= q < self.nb_boundaries:
                    self._push(side, q)
        return self.dims[0], self.dims[1]
