"""Costs: the multiply-adds a layout reports are those the kernel does, and the cost bound."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from structurednets.cost import Cost
from structurednets.testing import default_dtype
from structurednets_sss import SSSLayer, SSSSystem

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


@pytest.mark.parametrize("batch", [3, 100])  # joint recursions up to 64 rows, separate above
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
