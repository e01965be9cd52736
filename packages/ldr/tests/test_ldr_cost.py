"""The LDR cost model against multiply-adds counted while the kernels run."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from structurednets_ldr import LDRLayer, fit_ldr
from structurednets_ldr.cost import band_dots_cost, cost_ratio, schedule_cost
from structurednets_ldr.kernels import ops
from structurednets_ldr.layout import ldr_nb_weight_parameters

aten = torch.ops.aten
_CUSTOM = {
    torch.ops.structurednets_ldr.weight.default: ops._weight,
    torch.ops.structurednets_ldr.weight_backward.default: ops._weight_backward,
    torch.ops.structurednets_ldr.product.default: ops._product,
    torch.ops.structurednets_ldr.product_backward.default: ops._product_backward,
}


class MultiplyAdds(TorchDispatchMode):
    """Counts multiply-adds of every product and floating-point elementwise
    multiplication that runs, inside the LDR custom operators too (their Python bodies are run under the mode)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CUSTOM:
            with self:
                return _CUSTOM[func]._init_fn(*args, **kwargs)
        packet = func.overloadpacket
        if torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), "CompositeImplicitAutograd"
        ):  # einsum, matmul: reach the mode whole inside custom operators
            with self:
                return func.decompose(*args, **kwargs)
        if packet in (aten.mm, aten.bmm):
            self.count += math.prod(args[0].shape) * args[1].shape[-1]
        elif packet is aten.addmm:
            self.count += math.prod(args[1].shape) * args[2].shape[-1]
        elif packet in (aten.mul, aten.mul_, aten.addcmul, aten.addcmul_):
            result = func(*args, **kwargs)
            if result.is_floating_point():  # not the index arithmetic of the geometry
                self.count += result.numel()
            return result
        return func(*args, **kwargs)


def counted_step(layer: LDRLayer, batch: int) -> tuple[int, int]:
    """Multiply-adds counted in the forward and in the backward of a training call."""
    U = torch.randn(batch, layer.input_dim, dtype=torch.float64, requires_grad=True)
    with MultiplyAdds() as forward:
        Y = layer.multiply(U)
    with MultiplyAdds() as backward:
        Y.backward(torch.randn_like(Y))
    return forward.count, backward.count


@pytest.mark.parametrize(
    ("out_dim", "in_dim", "share", "columns"),
    [(24, 16, 0.5, None), (40, 40, 0.3, None), (33, 20, 0.6, 11), (64, 48, 0.4, None)],
)
@pytest.mark.parametrize("batch", [1, 5, 64, 300])
def test_layout_cost_counts_what_the_kernels_do(out_dim, in_dim, share, columns, batch):
    with torch.device("cpu"):
        torch.set_default_dtype(torch.float64)
        try:
            layer = LDRLayer(in_dim, out_dim, share, use_bias=False, krylov_columns=columns)
        finally:
            torch.set_default_dtype(torch.float32)
    cost = layer.cost(batch)
    assert (cost.forward, cost.backward) == counted_step(layer, batch)


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("chain", [1, 2, 3, 5, 16])
def test_every_schedule_is_counted(explicit, chain):
    """Forms and chain lengths the cost model does not choose, cut last chains among them."""
    out_dim, in_dim, m, r, batch = 30, 22, 17, 2, 7
    layer = LDRLayer(in_dim, out_dim, 0.9, use_bias=False, krylov_columns=m, displacement_rank=r)
    layer.double()
    U = torch.randn(batch, in_dim, dtype=torch.float64, requires_grad=True)
    operands = (layer.A_bands, layer.B_bands, layer.G, layer.H)
    with MultiplyAdds() as forward:
        Y = ops.multiply(U, *operands, m, chain, explicit)
    with MultiplyAdds() as backward:
        Y.backward(torch.randn_like(Y))
    cost = schedule_cost(out_dim, in_dim, m, r, batch, explicit, chain)
    assert (cost.forward, cost.backward) == (forward.count, backward.count)


def test_band_dots_cost_by_hand():
    # 10 rows: 8 interior in one chunk of 8 against 10 rows, then rows 0 and 9 against 3
    assert band_dots_cost(10, 4, chunk=16) == 8 * 10 * 4 + 2 * 3 * 4
    # 3 rows: one chunk of 1 row against 3, rows 0 and 2 against 3
    assert band_dots_cost(3, 1) == 1 * 3 + 2 * 3


def test_cost_of_a_layout_depends_on_the_batch_schedule():
    layer = LDRLayer(128, 128, 0.1)
    small, large = layer.cost(1), layer.cost(256)
    assert 0 < small.total < large.total
    # the explicit form for a large batch: at least the three dense products
    assert large.total >= 3 * 256 * 128 * 128


def test_max_cost_ratio_lowers_the_displacement_rank():
    free = LDRLayer(64, 64, 0.5)
    bound = 0.5 * (free.cost_ratio() + cost_ratio(64, 64, 64, 1))
    bounded = LDRLayer(64, 64, 0.5, max_cost_ratio=bound)
    assert bounded.cost_ratio() <= bound < free.cost_ratio()
    larger = [r for r in range(bounded.displacement_rank + 1, free.displacement_rank + 1)]
    assert all(cost_ratio(64, 64, 64, r) > bound for r in larger)
    assert "max_cost_ratio" not in bounded.layout.sizes
    assert LDRLayer.accepts_max_cost_ratio is True
    assert ldr_nb_weight_parameters(64, 64, 0.5, max_cost_ratio=bound) == free.nb_weight_parameters
    fitted = LDRLayer(64, 64, 0.5, initial_weight_matrix=torch.randn(64, 64), max_cost_ratio=bound)
    assert fitted.displacement_rank == bounded.displacement_rank


def test_max_cost_ratio_out_of_reach_names_the_smallest_ratio():
    smallest = min(cost_ratio(48, 32, 32, r) for r in range(1, 7))
    with pytest.raises(ValueError, match=f"smallest achievable cost ratio is {smallest:.3g}"):
        LDRLayer(32, 48, 0.5, max_cost_ratio=0.5 * smallest)
    with pytest.raises(ValueError, match="max_cost_ratio must be positive"):
        LDRLayer(32, 48, 0.5, max_cost_ratio=0.0)
    with pytest.raises(TypeError, match="max_cost_ratio"):
        LDRLayer(32, 48, 0.5, max_cost_ratio="1")
    too_costly = cost_ratio(48, 32, 32, 5) * 0.999
    with pytest.raises(ValueError, match="displacement_rank=5 costs more"):
        LDRLayer(32, 48, 0.5, displacement_rank=5, max_cost_ratio=too_costly)
    with pytest.raises(ValueError, match="displacement_rank=5 costs more"):
        fit_ldr(torch.randn(48, 32), 5, max_cost_ratio=too_costly)
