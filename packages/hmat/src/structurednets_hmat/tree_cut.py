"""The cut of the block cluster tree that ``merge_blocks=True`` fits on.

Each inner node of the tree is either kept whole as one leaf or split as in the standard
partition. For a price ``lam`` per parameter, the ranks and the cut minimising ``squared error +
lam * parameters`` are found bottom-up, node by node; bisection on ``lam`` gives the cheapest
such solution that fits the budget. These are the allocations on the lower convex hull of
(parameters, error) over all cuts and ranks; ties keep the standard partition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from structurednets_hmat.allocation import LeafSpectrum
from structurednets_hmat.partition import TreeNode

__all__ = ["Cut", "best_cut"]


@dataclass(frozen=True)
class Cut:
    """Blocks of the tree chosen as leaves (tree positions), with their ranks and forms."""

    nodes: tuple[int, ...]
    ranks: tuple[int, ...]
    dense: tuple[bool, ...]
    nb_parameters: int


class _PricedTree:
    """The tree's nodes as arrays (sizes, squared singular values, energies), to solve the
    priced problem for one ``lam`` after another."""

    def __init__(self, tree: list[TreeNode], spectra: list[LeafSpectrum]) -> None:
        self.tree = tree
        sizes = np.array([[n.block.nb_rows, n.block.nb_cols] for n in tree], dtype=np.float64)
        self.per_rank = sizes.sum(axis=1)
        self.dense_size = sizes.prod(axis=1)
        width = max(1, max(spectrum.squared_singular_values.size for spectrum in spectra))
        values = np.full((len(tree), width), -np.inf)
        for position, spectrum in enumerate(spectra):
            squares = spectrum.squared_singular_values
            values[position, : squares.size] = squares
        self.values = values
        finite = np.where(np.isfinite(values), values, 0.0)
        self.captured = np.concatenate([np.zeros((len(tree), 1)), np.cumsum(finite, axis=1)], 1)
        self.energy = np.array([spectrum.energy for spectrum in spectra])

    def highest_price(self) -> float:
        """A ``lam`` above every ratio: rank 0 everywhere, no parameters."""
        first = np.where(np.isfinite(self.values[:, 0]), self.values[:, 0], 0.0)
        ratios = first / self.per_rank
        return 2.0 * max(float(ratios.max()), float((self.energy / self.dense_size).max()), 1e-300)

    def solve(self, lam: float) -> Cut:
        """The cut and ranks minimising ``squared error + lam * parameters``."""
        tree = self.tree
        rank = (self.values > lam * self.per_rank[:, None]).sum(axis=1)
        low_cost = self.energy - self.captured[np.arange(len(tree)), rank]
        low_cost = low_cost + lam * rank * self.per_rank
        dense = lam * self.dense_size < low_cost
        own_cost = np.where(dense, lam * self.dense_size, low_cost)
        cost = own_cost.copy()
        params = np.where(dense, self.dense_size, rank * self.per_rank)
        split = np.zeros(len(tree), dtype=bool)
        for position in range(len(tree) - 1, -1, -1):  # children before parents
            children = tree[position].children
            if children:
                children_cost = sum(cost[child] for child in children)
                if children_cost <= own_cost[position]:
                    split[position] = True
                    cost[position] = children_cost
                    params[position] = sum(params[child] for child in children)
        nodes, stack = [], [0]
        while stack:
            position = stack.pop()
            if split[position]:
                stack.extend(tree[position].children)
            else:
                nodes.append(position)
        nodes.sort()
        return Cut(
            tuple(nodes),
            tuple(int(rank[n]) for n in nodes),
            tuple(bool(dense[n]) for n in nodes),
            int(params[0]),
        )


def best_cut(tree: list[TreeNode], spectra: list[LeafSpectrum], budget: int) -> Cut:
    """The cut of the block cluster tree and ranks minimising ``error + lam * parameters``,
    for the smallest ``lam`` (found by bisection on a log scale) whose minimiser fits the
    budget. ``spectra[i]`` belongs to ``tree[i]``."""
    priced = _PricedTree(tree, spectra)
    high = priced.highest_price()
    low = high * 1e-30
    best = priced.solve(high)
    finest = priced.solve(low)
    if finest.nb_parameters <= budget:
        return finest
    for _ in range(80):
        middle = math.sqrt(low * high)
        cut = priced.solve(middle)
        if cut.nb_parameters <= budget:
            high, best = middle, cut
        else:
            low = middle
    return best
