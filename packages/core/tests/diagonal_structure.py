"""A toy structure defined only in the tests: W is zero except on its main diagonal.

It is registered in-process (no entry point), proving that third parties can add a
structure without touching core, and it exercises the conformance kit in core's own suite.
"""

import math

import torch
from torch import nn

from structurednets import StructuredLayer
from structurednets.cost import Cost
from structurednets.layers.structured_layer import dense_init_std
from structurednets.validation import BudgetTooSmallError, weight_budget


def diagonal_nb_weight_parameters(input_dim, output_dim, nb_params_share):
    needed = min(input_dim, output_dim)
    if needed > weight_budget(input_dim, output_dim, nb_params_share):
        raise BudgetTooSmallError("diagonal", input_dim, output_dim, nb_params_share, needed)
    return needed


class DiagonalLayer(StructuredLayer):
    """W[i, i] = d[i] for i < min(input_dim, output_dim), zero elsewhere.

    Args:
        input_dim, output_dim, nb_params_share, use_bias, initial_weight_matrix, initial_bias:
            as for every StructuredLayer; the fit keeps the diagonal of the matrix.

    Shape:
        input ``(..., input_dim)``, output ``(..., output_dim)``.

    Attributes:
        diagonal: ``d``, shape ``(min(input_dim, output_dim),)``.

    Example:
        >>> layer = DiagonalLayer(4, 3, 1.0, use_bias=False)
        >>> layer.diagonal.shape
        torch.Size([3])
    """

    structure_name = "diagonal"

    def __init__(
        self,
        input_dim,
        output_dim,
        nb_params_share,
        use_bias=True,
        initial_weight_matrix=None,
        initial_bias=None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, initial_bias)
        target = self.checked_weight_matrix(initial_weight_matrix)
        size = diagonal_nb_weight_parameters(self.input_dim, self.output_dim, self.nb_params_share)
        if target is not None:
            diagonal = torch.diagonal(target)[:size]
        else:
            # Spread nn.Linear's total variance over the diagonal entries.
            std = dense_init_std(self.input_dim) * math.sqrt(
                self.input_dim * self.output_dim / size
            )
            diagonal = torch.randn(size, dtype=torch.float64) * std
        self.diagonal = nn.Parameter(diagonal.to(torch.get_default_dtype()))

    @classmethod
    def layout_cost(cls, layout, batch_size):
        size = min(layout.input_dim, layout.output_dim)
        return Cost(batch_size * size, 2 * batch_size * size)

    def layout_sizes(self):
        return {}

    def lr_multipliers(self):
        """The entries are sqrt(in * out / size) times a dense layer's; so is their rate."""
        size = self.diagonal.numel()
        return {"diagonal": math.sqrt(self.input_dim * self.output_dim / size)}

    def multiply(self, U):
        size = self.diagonal.numel()
        product = U[:, :size] * self.diagonal
        return nn.functional.pad(product, (0, self.output_dim - size))


class UpcastsUnderAutocast(DiagonalLayer):
    """Computes in float32 whatever the dtype it is given (returns float32 under autocast)."""

    def multiply(self, U):
        size = self.diagonal.numel()
        product = U[:, :size].float() * self.diagonal.float()
        return torch.nn.functional.pad(product, (0, self.output_dim - size)).to(
            torch.promote_types(U.dtype, torch.float32)
        )
