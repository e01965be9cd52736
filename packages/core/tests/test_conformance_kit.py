"""The kit passes a correct structure and catches broken ones."""

import pytest
import torch
from diagonal_structure import DiagonalLayer, UpcastsUnderAutocast, diagonal_nb_weight_parameters

import structurednets
from structurednets.testing import ConformanceCase, check_structure, conformance_checks

# Checks that take seconds; the tests of the kit itself skip them where they are not the point.
SLOW = ("distributed_training", "torch_compile", "random_valid_arguments")


@pytest.mark.parametrize("check", conformance_checks(), ids=str)
def test_diagonal_structure_passes_every_check(diagonal_structure, check):
    check(ConformanceCase("diagonal"))


class WrongDense(DiagonalLayer):
    """to_dense disagrees with forward (transposed diagonal offset)."""

    def to_dense(self):
        return torch.roll(super().to_dense(), 1, dims=0)


class OverBudget(DiagonalLayer):
    """Holds one extra scalar that its count function does not predict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = torch.nn.Parameter(torch.zeros(1))

    def multiply(self, U):
        return super().multiply(U) + 0 * self.extra


class NoInputCheck(DiagonalLayer):
    """Skips the base class's input checks."""

    def forward(self, U):
        return self.multiply(U) + self.bias


class IgnoresWeightMatrix(DiagonalLayer):
    def __init__(
        self,
        input_dim,
        output_dim,
        nb_params_share,
        use_bias=True,
        initial_weight_matrix=None,
        initial_bias=None,
    ):
        super().__init__(input_dim, output_dim, nb_params_share, use_bias, None, initial_bias)


class DeadParameter(DiagonalLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unused = torch.nn.Parameter(torch.ones(1))


class ForgetsItsLayout(DiagonalLayer):
    """A shape decided at construction (a diagonal offset) that ``layout_sizes`` leaves out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("offset", torch.tensor(0))
        if kwargs.get("initial_weight_matrix") is not None:
            self.keep = torch.nn.Parameter(torch.zeros(1))

    def multiply(self, U):
        extra = 0 * self.keep if hasattr(self, "keep") else 0
        return super().multiply(U) + extra


class WrongExample(DiagonalLayer):
    """W[i, i] = d[i].

    Args:
        input_dim: as for every layer.

    Shape:
        as for every layer.

    Attributes:
        diagonal: the diagonal.

    Example:
        >>> WrongExample(4, 3, 1.0).diagonal.shape
        torch.Size([4])
    """


class TooQuiet(DiagonalLayer):
    """Spreads no variance: the diagonal has a dense layer's scale, so W's outputs fade."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            size = self.diagonal.numel()
            self.diagonal.mul_((size / (self.input_dim * self.output_dim)) ** 0.5)

    def lr_multipliers(self):
        return {}


class NoMultipliers(DiagonalLayer):
    """Right output scale, but its large entries move at a dense layer's rate."""

    def lr_multipliers(self):
        return {}


def count_with_extra(input_dim, output_dim, share):
    return diagonal_nb_weight_parameters(input_dim, output_dim, share) + 1


@pytest.mark.parametrize(
    ("layer_class", "count", "failing_check"),
    [
        (WrongDense, diagonal_nb_weight_parameters, "forward_matches_dense"),
        (OverBudget, diagonal_nb_weight_parameters, "budget_and_parameter_counts"),
        (NoInputCheck, diagonal_nb_weight_parameters, "bad_inputs"),
        (IgnoresWeightMatrix, diagonal_nb_weight_parameters, "initial_weight_matrix"),
        (DeadParameter, count_with_extra, "gradients"),
        (ForgetsItsLayout, diagonal_nb_weight_parameters, "layout_round_trip"),
        (WrongExample, diagonal_nb_weight_parameters, "docstring_example"),
        (TooQuiet, diagonal_nb_weight_parameters, "output_variance"),
        (NoMultipliers, diagonal_nb_weight_parameters, "update_scale"),
        (UpcastsUnderAutocast, diagonal_nb_weight_parameters, "dtypes_and_autocast"),
    ],
)
def test_kit_catches_broken_structures(layer_class, count, failing_check):
    structurednets.register("broken", layer_class, count)
    try:
        with pytest.raises(AssertionError, match=failing_check):
            check_structure("broken", skip={name: "slow, not under test" for name in SLOW})
    finally:
        structurednets.unregister("broken")


def test_skip_is_honoured(diagonal_structure):
    skips = {"gradients": "not differentiable", **{name: "slow" for name in SLOW}}
    skipped = check_structure("diagonal", skip=skips)
    assert "gradients: diagonal: not differentiable" in skipped
