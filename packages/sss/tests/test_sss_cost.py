"""Costs: the multiply-adds a layout reports are those the kernel does, and the cost bound."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from structurednets.cost import Cost
from structurednets.testing import default_dtype
from structurednets_sss import SSSLayer, SSSSizes, SSSSystem, fit_sss, sss_nb_weight_parameters

# Ragged blocks and states of different dimensions: every stack is padded.
RAGGED = ((6, 2, 8, 5), (4, 6, 4, 3), (7, 1, 2), (1, 3, 0))


class _MatmulCounter(TorchDispatchMode):
    """Multiply-adds of every matrix product dispatched, from its operands' shapes.

    FlopCounterMode does not count the in-place ``addmm_``/``baddbmm_`` the kernel uses.
    """

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm"):
            left, right = args[0], args[1]
        elif name in ("addmm", "addmm_", "baddbmm", "baddbmm_"):
            left, right = args[1], args[2]
        else:
            left = None
        if left is not None:
            self.count += left.numel() * right.shape[-1]
        return func(*args, **(kwargs or {}))


def _counted(layer, batch, backward):
    """Multiply-adds of the products in a forward (or a backward with the input's gradient)."""
    U = torch.randn(batch, layer.input_dim, dtype=torch.float64, requires_grad=backward)
    with _MatmulCounter() as forward_counter:
        Y = layer(U)
    if not backward:
        return forward_counter.count
    grad = torch.randn_like(Y)
    with _MatmulCounter() as backward_counter:
        Y.backward(grad)
    return backward_counter.count


@pytest.mark.parametrize("batch", [1, 100])
def test_cost_is_what_the_kernel_multiplies(random_stage_matrices, batch):
    with default_dtype(torch.float64):
        layer = SSSLayer(21, 17, 1.0, system=SSSSystem(**random_stage_matrices(*RAGGED)))
    cost = layer.cost(batch)
    assert cost.forward == _counted(layer, batch, backward=False)
    assert cost.backward == _counted(layer, batch, backward=True)


def test_cost_counted_by_hand_on_a_small_layout(random_stage_matrices):
    # Padded to mb = 6, nb = 8, dx = 7, dz = 3 over K = 4 stages: [D; B; F] 4*(6+7+3)*8 =
    # 512; [C, G] 4*6*(7+3) = 240; A, E 2*(49+9) = 116; 868 per sample.
    with default_dtype(torch.float64):
        layer = SSSLayer(21, 17, 1.0, system=SSSSystem(**random_stage_matrices(*RAGGED)))
    assert layer.cost(5) == Cost(5 * 868, 10 * 868)
    one_stage = SSSLayer(12, 10, 1.0, nb_stages=1)
    assert one_stage.cost(7) == Cost(7 * 120, 14 * 120)
    assert one_stage.cost_ratio() == pytest.approx(1.0)


def _trained_like(m, n, seed=0):
    """A matrix with a decaying spectrum and a strong diagonal band, as trained weights have."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(m, m, generator=generator, dtype=torch.float64)
    right = torch.randn(n, n, generator=generator, dtype=torch.float64)
    spectrum = 1.0 / (1.0 + torch.arange(min(m, n), dtype=torch.float64))
    low = (left[:, : len(spectrum)] * spectrum) @ right[: len(spectrum)]
    return low / low.norm() + torch.eye(m, n, dtype=torch.float64) / 4


def test_fit_respects_max_cost_ratio_and_trades_error_for_it():
    target = _trained_like(96, 80)
    unbounded = SSSLayer(80, 96, 0.3, initial_weight_matrix=target)
    errors = []
    for bound in (0.3, 0.2, 0.1):
        layer = SSSLayer(80, 96, 0.3, initial_weight_matrix=target, max_cost_ratio=bound)
        assert layer.cost_ratio() <= bound
        assert "max_cost_ratio" not in layer.layout.sizes
        errors.append(float((layer.to_dense().detach().double() - target).norm()))
    assert errors == sorted(errors)  # a tighter bound cannot fit better
    loose = SSSLayer(80, 96, 0.3, initial_weight_matrix=target, max_cost_ratio=10.0)
    assert loose.layout == unbounded.layout
    assert (
        fit_sss(target, 2304, max_cost_ratio=0.2).sizes
        == SSSLayer(80, 96, 0.3, initial_weight_matrix=target, max_cost_ratio=0.2).sizes
    )


def test_an_unreachable_cost_bound_names_the_smallest_ratio():
    target = _trained_like(48, 48)
    cheapest = SSSSizes((1,) * 48, (1,) * 48, (0,) * 47, (0,) * 47)  # 48 scalar stages
    smallest = cheapest.padded_nb_parameters / 48**2
    with pytest.raises(ValueError, match=f"smallest cost ratio .* {smallest:.4f}"):
        SSSLayer(48, 48, 0.5, initial_weight_matrix=target, max_cost_ratio=smallest / 2)
    layer = SSSLayer(48, 48, 0.5, initial_weight_matrix=target, max_cost_ratio=smallest)
    assert layer.cost_ratio() == pytest.approx(smallest)
    with pytest.raises(ValueError, match="max_cost_ratio=0.01 is below the cost ratio"):
        SSSLayer(48, 48, 0.5, nb_stages=4, max_cost_ratio=0.01)


def test_max_cost_ratio_is_a_fit_control():
    assert SSSLayer.accepts_max_cost_ratio is True
    assert sss_nb_weight_parameters(64, 64, 0.3, max_cost_ratio=0.1) == sss_nb_weight_parameters(
        64, 64, 0.3
    )
    with pytest.raises(ValueError, match="max_cost_ratio must be > 0, got -1"):
        SSSLayer(64, 64, 0.3, max_cost_ratio=-1)
    with pytest.raises(TypeError, match="max_cost_ratio must be a positive number"):
        fit_sss(torch.eye(8), 40, max_cost_ratio="fast")


def test_inference_stacks_follow_parameter_changes():
    torch.manual_seed(0)
    layer = SSSLayer(30, 20, 0.5, nb_stages=4)
    U = torch.randn(3, 30)

    def check():
        expected = (U @ layer.to_dense().T + layer.bias).detach()  # gathered afresh (autograd)
        with torch.no_grad():
            assert torch.allclose(layer(U), expected, atol=1e-5)

    check()
    with torch.no_grad():
        layer.A.mul_(3.0)  # in place: a new version
    check()
    twin = SSSLayer(30, 20, 0.5, nb_stages=4)
    layer.load_state_dict(twin.state_dict())
    check()
    layer.double()
    U = U.double()
    check()
