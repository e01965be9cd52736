"""A second test-only structure: W is a full matrix, so it needs the whole budget (share 1).

With the 'diagonal' structure it gives the workflow tests a choice between an exact but
expensive structure and a cheap but rough one.
"""

import torch
from torch import nn

from structurednets import StructuredLayer
from structurednets.cost import dense_cost
from structurednets.layers.structured_layer import dense_init_std
from structurednets.validation import BudgetTooSmallError, weight_budget


def full_nb_weight_parameters(input_dim, output_dim, nb_params_share):
    needed = input_dim * output_dim
    if needed > weight_budget(input_dim, output_dim, nb_params_share):
        raise BudgetTooSmallError("full", input_dim, output_dim, nb_params_share, needed)
    return needed


class FullLayer(StructuredLayer):
    """W is stored as it is (the dense layer, seen as a structure).

    Args:
        input_dim, output_dim, nb_params_share, use_bias, initial_weight_matrix, initial_bias:
            as for every StructuredLayer; it needs ``nb_params_share=1``.

    Shape:
        input ``(..., input_dim)``, output ``(..., output_dim)``.

    Attributes:
        weight: ``W``, shape ``(output_dim, input_dim)``.

    Example:
        >>> FullLayer(4, 3, 1.0).weight.shape
        torch.Size([3, 4])
    """

    structure_name = "full"

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
        full_nb_weight_parameters(self.input_dim, self.output_dim, self.nb_params_share)
        if target is None:
            shape = (self.output_dim, self.input_dim)
            target = torch.randn(shape, dtype=torch.float64) * dense_init_std(self.input_dim)
        self.weight = nn.Parameter(target.to(torch.get_default_dtype()))

    @classmethod
    def layout_cost(cls, layout, batch_size):
        return dense_cost(layout.input_dim, layout.output_dim, batch_size)

    def layout_sizes(self):
        return {}

    def multiply(self, U):
        return U @ self.weight.T
