"""An explicit SSS system: the stage matrices ``A_k .. G_k`` of both parts."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from structurednets.plugin import BudgetTooSmallError, as_matrix, weight_budget
from structurednets_sss.layout import KINDS, SSSSizes

__all__ = ["SSSSystem", "check_system_fits", "diagonal_gain", "random_system"]

# Which stage's matrix of each kind may be ``None`` (it always has a zero-size dimension).
_ENDS = {"A": (0, -1), "B": (-1,), "C": (0,), "E": (0, -1), "F": (0,), "G": (-1,)}


@dataclass(frozen=True)
class SSSSystem:
    """The stage matrices of a sequentially semiseparable matrix ``W`` (``y = W u``).

    With ``u`` split into blocks ``u_0 .. u_{K-1}`` and ``y`` into ``y_0 .. y_{K-1}``::

        causal:      x_{k+1} = A_k x_k + B_k u_k
        anticausal:  z_{k-1} = E_k z_k + F_k u_k
        output:      y_k     = C_k x_k + D_k u_k + G_k z_k

    with ``x_0`` and ``z_{K-1}`` empty (dimension 0). Each field is a sequence of ``K``
    matrices (numpy arrays or tensors), one per stage. The matrices that act on or produce an
    empty state have a zero-size dimension (``A_0``, ``C_0``, ``A_{K-1}``, ``B_{K-1}`` and
    ``E_0``, ``F_0``, ``E_{K-1}``, ``G_{K-1}``); for those, ``None`` may be given.

    Shapes, with ``n_k``/``m_k`` the input/output block sizes and ``dx_k``/``dz_k`` the state
    dimensions: ``D_k`` (m_k, n_k), ``A_k`` (dx_{k+1}, dx_k), ``B_k`` (dx_{k+1}, n_k),
    ``C_k`` (m_k, dx_k), ``E_k`` (dz_{k-1}, dz_k), ``F_k`` (dz_{k-1}, n_k), ``G_k`` (m_k, dz_k).
    """

    D: tuple
    A: tuple
    B: tuple
    C: tuple
    E: tuple
    F: tuple
    G: tuple

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise TypeError(
                    f"SSSSystem.{field.name} must be a sequence of one matrix per stage, "
                    f"got {type(value).__name__}"
                )
            object.__setattr__(self, field.name, tuple(value))

    @property
    def nb_stages(self) -> int:
        return len(self.D)

    def sizes(self) -> SSSSizes:
        """The sizes of the system; raises ``ValueError`` if the shapes do not fit together."""
        return self.checked()[0]

    def checked(self) -> tuple[SSSSizes, dict[str, list[torch.Tensor]]]:
        """The sizes and the matrices as float64 CPU tensors (``None`` entries filled in).

        Raises ``TypeError``/``ValueError`` naming the first matrix whose type or shape is wrong.
        """
        K = self.nb_stages
        if K < 1:
            raise ValueError("an SSSSystem needs at least one stage (D must not be empty)")
        for kind in KINDS:
            if len(getattr(self, kind)) != K:
                raise ValueError(
                    f"SSSSystem.{kind} has {len(getattr(self, kind))} matrices but D has {K}; "
                    "give one matrix per stage"
                )
        diagonal = [_given_matrix("D", k, self.D[k]) for k in range(K)]
        input_sizes = tuple(int(d.shape[1]) for d in diagonal)
        output_sizes = tuple(int(d.shape[0]) for d in diagonal)
        causal = tuple(_leading_dim("B", k, self.B[k]) for k in range(K - 1))
        anticausal = tuple(_leading_dim("F", k, self.F[k]) for k in range(1, K))
        sizes = SSSSizes(input_sizes, output_sizes, causal, anticausal)
        shapes = sizes.stage_shapes()
        matrices: dict[str, list[torch.Tensor]] = {}
        for kind in KINDS:
            checked = []
            for k, (value, shape) in enumerate(zip(getattr(self, kind), shapes[kind], strict=True)):
                name = f"SSSSystem.{kind}[{k}]"
                if value is None:
                    if k - K not in _ENDS.get(kind, ()) and k not in _ENDS.get(kind, ()):
                        raise TypeError(f"{name} is None, but only end-stage matrices may be")
                    checked.append(torch.zeros(shape, dtype=torch.float64))
                else:
                    checked.append(as_matrix(name, value, *shape, f"{kind}_{k}"))
            matrices[kind] = checked
        return sizes, matrices

    def to_dense(self) -> torch.Tensor:
        """The represented ``W`` (float64), shape ``(sum m_k, sum n_k)``, stage by stage."""
        sizes, mat = self.checked()
        K = sizes.nb_stages
        row = [0, *torch.tensor(sizes.output_sizes).cumsum(0).tolist()]
        col = [0, *torch.tensor(sizes.input_sizes).cumsum(0).tolist()]
        dense = torch.zeros(row[-1], col[-1], dtype=torch.float64)
        for j in range(K):
            dense[row[j] : row[j + 1], col[j] : col[j + 1]] = mat["D"][j]
            state = mat["B"][j]  # x_{j+1} as a function of u_j
            for k in range(j + 1, K):
                dense[row[k] : row[k + 1], col[j] : col[j + 1]] = mat["C"][k] @ state
                state = mat["A"][k] @ state
            state = mat["F"][j]  # z_{j-1} as a function of u_j
            for k in range(j - 1, -1, -1):
                dense[row[k] : row[k + 1], col[j] : col[j + 1]] = mat["G"][k] @ state
                state = mat["E"][k] @ state
        return dense

    @property
    def nb_weight_parameters(self) -> int:
        return self.sizes().nb_weight_parameters


def _given_matrix(kind: str, k: int, value: object) -> torch.Tensor:
    if value is None or not hasattr(value, "shape") or len(value.shape) != 2:
        raise TypeError(
            f"SSSSystem.{kind}[{k}] must be a 2-D array or tensor, got {type(value).__name__}"
        )
    return as_matrix(f"SSSSystem.{kind}[{k}]", value, *value.shape, f"{kind}_{k}")


def _leading_dim(kind: str, k: int, value: object) -> int:
    return int(_given_matrix(kind, k, value).shape[0])


def check_system_fits(
    system: SSSSystem, input_dim: int, output_dim: int, nb_params_share: float
) -> SSSSizes:
    """The system's sizes, after checking its block sizes against the layer's dimensions and its
    parameter count against the budget (:class:`BudgetTooSmallError`)."""
    sizes = system.sizes()
    if sum(sizes.input_sizes) != input_dim or sum(sizes.output_sizes) != output_dim:
        raise ValueError(
            f"system represents a {sum(sizes.output_sizes)} x {sum(sizes.input_sizes)} matrix "
            f"(rows of D summed x columns of D summed), but the layer is {output_dim} x "
            f"{input_dim} (output_dim x input_dim)"
        )
    if sizes.nb_weight_parameters > weight_budget(input_dim, output_dim, nb_params_share):
        raise BudgetTooSmallError(
            "sss",
            input_dim,
            output_dim,
            nb_params_share,
            sizes.nb_weight_parameters,
            f"the given system ({sizes.describe()})",
        )
    return sizes


def _semi_orthogonal(rows: int, cols: int) -> torch.Tensor:
    """A random ``rows x cols`` matrix with orthonormal rows or columns (float64)."""
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, dtype=torch.float64)
    gaussian = torch.randn(max(rows, cols), min(rows, cols), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    return q if rows >= cols else q.T


def diagonal_gain(sizes: SSSSizes) -> float:
    """How much larger than a dense layer's the random ``D_k`` entries are:
    ``sqrt((unreached + diagonal) / diagonal)``, where ``unreached`` counts the entries of
    ``W`` outside the ``D_k`` blocks that no state reaches (they are zero), so that ``W``
    keeps ``nn.Linear``'s total variance (1.0 when the states reach every block)."""
    n, m, K = sizes.input_sizes, sizes.output_sizes, sizes.nb_stages
    diagonal = sum(m[k] * n[k] for k in range(K))
    reached = diagonal
    for j in range(K):
        for k in range(j + 1, K):
            if min(sizes.causal_dims[j:k]) > 0:  # x crosses every boundary from j to k
                reached += m[k] * n[j]
            if min(sizes.anticausal_dims[j:k]) > 0:  # z crosses them backwards
                reached += m[j] * n[k]
    return ((sum(m) * sum(n) - reached + diagonal) / diagonal) ** 0.5


def random_system(sizes: SSSSizes, std: float) -> dict[str, list[torch.Tensor]]:
    """Random stage matrices (float64, from torch's generator) whose ``W`` has entries of
    standard deviation about ``std``.

    ``D_k`` is Gaussian with that deviation. The transitions ``A_k``, ``E_k`` are
    semi-orthogonal, so a state neither grows nor fades along the stages; ``B_k``, ``C_k``
    (and ``F_k``, ``G_k``) are Gaussian with variance ``std / sqrt(d)`` each, ``d`` the state
    dimension, so that ``C_k A .. A B_j`` has entries of variance ``std**2``.
    """
    shapes = sizes.stage_shapes()
    matrices: dict[str, list[torch.Tensor]] = {kind: [] for kind in KINDS}
    d_std = std * diagonal_gain(sizes)
    for k in range(sizes.nb_stages):
        matrices["D"].append(torch.randn(shapes["D"][k], dtype=torch.float64) * d_std)
        for transition, inp, out in (("A", "B", "C"), ("E", "F", "G")):
            matrices[transition].append(_semi_orthogonal(*shapes[transition][k]))
            for kind, dim in ((inp, shapes[inp][k][0]), (out, shapes[out][k][1])):
                scale = (std / max(dim, 1) ** 0.5) ** 0.5
                matrices[kind].append(torch.randn(shapes[kind][k], dtype=torch.float64) * scale)
    return matrices
