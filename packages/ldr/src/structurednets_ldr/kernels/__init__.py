"""The LDR kernels: the products ``W`` and ``U W^T`` and their backward passes.

- :mod:`~structurednets_ldr.kernels.ops`: the public :func:`weight` and :func:`multiply`, as
  ``torch.library`` custom operators (autograd, shape functions, ``torch.compile``);
- :mod:`~structurednets_ldr.kernels.forms`: the explicit and factored forms, forward and
  backward;
- :mod:`~structurednets_ldr.kernels.krylov`: the chain starts ``[G, A^b G, ...]`` and their
  adjoint;
- :mod:`~structurednets_ldr.kernels.stencils`: the three-band steps they are made of;
- :mod:`~structurednets_ldr.kernels.compiled`: numba loops that build ``W`` for inference
  (optional, ``structurednets-ldr[fast]``);
- :mod:`~structurednets_ldr.kernels.scratch`: per-thread buffers for the temporaries.

Which form and chain length a call uses comes from :mod:`structurednets_ldr.schedule`.
"""

from structurednets_ldr.kernels.ops import multiply, weight
from structurednets_ldr.kernels.scratch import release_scratch

__all__ = ["multiply", "release_scratch", "weight"]
