"""An H-matrix: a partition with ranks and the factors of every leaf."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from structurednets.plugin import as_matrix
from structurednets_hmat.partition import HMatrixPartition

__all__ = ["HMatrix"]


@dataclass(frozen=True)
class HMatrix:
    """An H-matrix: a partition with ranks and the factors of every leaf (float64 tensors).

    ``factors[i]`` belongs to ``partition.leaves[i]``: ``(L, R)`` with ``L`` of shape
    ``(rows, rank)`` and ``R`` of shape ``(rank, cols)`` for a low-rank leaf (the block is
    ``L @ R``), or ``(D,)`` with ``D`` of shape ``(rows, cols)`` for a dense leaf. Arrays are
    accepted and converted.
    """

    partition: HMatrixPartition
    factors: tuple[tuple[torch.Tensor, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.partition, HMatrixPartition):
            raise TypeError(
                f"partition must be an HMatrixPartition, got {type(self.partition).__name__}"
            )
        leaves = self.partition.leaves
        if len(self.factors) != len(leaves):
            raise ValueError(
                f"factors must hold one entry per leaf ({len(leaves)}), got {len(self.factors)}"
            )
        checked = []
        for index, (leaf, factor) in enumerate(zip(leaves, self.factors, strict=True)):
            name = f"factors[{index}]"
            if leaf.dense:
                if len(factor) != 1:
                    raise ValueError(f"{name} must be (D,) for the dense leaf {leaf}")
                checked.append(
                    (as_matrix(f"{name}[0] (D)", factor[0], *leaf.shape, "rows x cols"),)
                )
            else:
                if len(factor) != 2:
                    raise ValueError(f"{name} must be (L, R) for the low-rank leaf {leaf}")
                left = as_matrix(
                    f"{name}[0] (L)", factor[0], leaf.nb_rows, leaf.rank, "rows x rank"
                )
                right = as_matrix(
                    f"{name}[1] (R)", factor[1], leaf.rank, leaf.nb_cols, "rank x cols"
                )
                checked.append((left, right))
        object.__setattr__(self, "factors", tuple(checked))

    @property
    def shape(self) -> tuple[int, int]:
        return self.partition.shape

    @property
    def nb_parameters(self) -> int:
        return self.partition.nb_parameters

    def block(self, index: int) -> torch.Tensor:
        """Leaf ``index`` as a dense ``(rows, cols)`` float64 tensor."""
        factor = self.factors[index]
        return factor[0] if len(factor) == 1 else factor[0] @ factor[1]

    def to_dense(self) -> torch.Tensor:
        """The represented ``(output_dim, input_dim)`` matrix, float64."""
        matrix = torch.zeros(self.shape, dtype=torch.float64)
        for index, leaf in enumerate(self.partition.leaves):
            matrix[leaf.rows, leaf.cols] = self.block(index)
        return matrix
