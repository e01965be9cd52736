"""Input statistics for calibration-aware fitting: fit ``W~`` to ``W`` in the output error.

A layer ``y = W x`` that sees inputs ``X`` (``n_samples x input_dim``) is judged by the output
error ``||(W - W~) X^T||_F``. With the second moment ``C = X^T X / n`` this is
``sqrt(n) ||(W - W~) S||_F`` for any ``S`` with ``S S^T = C``, so every fit in the weighted
norm works on ``W S`` (the "whitened" target) instead of ``W``.

:class:`InputStatistics` accumulates ``C`` in float64, streaming (memory ``input_dim^2``).
Fits use the *damped* second moment ``C + lambda I`` with
``lambda = damping * trace(C) / input_dim`` (default ``damping=0.01``): it keeps the problem
well posed when ``C`` is singular (dead ReLU inputs, padding, fewer samples than
``input_dim``), steers the directions the samples never visit towards the weight fit, and
guards against over-fitting the calibration samples. An all-zero ``C`` gives the plain weight
fit. Reported output errors use the undamped ``C``.

>>> stats = InputStatistics(512)
>>> for batch in batches:  # doctest: +SKIP
...     stats.update(batch)
>>> S = stats.whitening_factor()  # (512, 512), S @ S = C + lambda I  # doctest: +SKIP
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = [
    "DEFAULT_DAMPING",
    "InputStatistics",
    "as_input_statistics",
    "output_relative_error",
]

#: Relative damping of the second moment, ``lambda = damping * trace(C) / input_dim``.
DEFAULT_DAMPING = 1e-2
#: Eigenvalues of the damped moment below this share of the largest are raised to it, so that
#: the whitening factor stays invertible in float64 even with ``damping=0``.
_EIGENVALUE_FLOOR = 1e-12
#: Rows converted to float64 at a time in :meth:`InputStatistics.update`.
_CHUNK = 4096


def _check_damping(damping: object) -> float:
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(f"damping must be a non-negative number, got {damping!r}")
    value = float(damping)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    return value


def _as_tensor(name: str, value: object) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise TypeError(
                f"{name} must hold floating-point numbers, got numpy dtype {value.dtype}"
            )
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        return value.detach()
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")


class InputStatistics:
    """The float64 second moment ``C = sum_i x_i x_i^T / n`` of a layer's inputs, streaming.

    Args:
        input_dim: width of the inputs.
        damping: relative damping of :meth:`damped_covariance` (see the module docstring).
        name: what the inputs are called in error messages (e.g. ``"inputs of layer fc1"``).

    Attributes:
        nb_samples: rows seen so far (a ``(..., input_dim)`` batch counts its leading dims).
    """

    def __init__(self, input_dim: int, *, damping: float = DEFAULT_DAMPING, name: str = "inputs"):
        if isinstance(input_dim, bool) or not isinstance(input_dim, numbers.Integral):
            raise TypeError(f"input_dim must be a positive integer, got {input_dim!r}")
        if input_dim < 1:
            raise ValueError(f"input_dim must be a positive integer, got {input_dim}")
        self.input_dim = int(input_dim)
        self.damping = _check_damping(damping)
        self.name = name
        self.nb_samples = 0
        self._sum: torch.Tensor | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self._given = False  # built from a covariance: no samples to add to

    @classmethod
    def from_covariance(
        cls,
        covariance: object,
        *,
        damping: float = DEFAULT_DAMPING,
        name: str = "input_covariance",
    ) -> InputStatistics:
        """Statistics holding a given symmetric positive semi-definite ``(d, d)`` second moment.

        Raises ``TypeError``/``ValueError`` naming ``name`` for a non-square, non-symmetric,
        non-finite matrix or one with negative eigenvalues beyond round-off (``1e-6`` of the
        largest); round-off asymmetry and negative eigenvalues are removed.
        """
        matrix = _as_tensor(name, covariance)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise ValueError(
                f"{name} must be a square (input_dim, input_dim) matrix, "
                f"got shape {tuple(matrix.shape)}"
            )
        matrix = matrix.to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(matrix).all():
            raise ValueError(f"{name} must be finite, but it holds NaN or infinite entries")
        scale = float(matrix.abs().max())
        asymmetry = float((matrix - matrix.T).abs().max())
        if asymmetry > 1e-5 * scale:
            raise ValueError(
                f"{name} must be symmetric, but |C - C^T| reaches {asymmetry:.3g} "
                f"(largest entry {scale:.3g})"
            )
        matrix = (matrix + matrix.T) / 2
        eigenvalues, vectors = torch.linalg.eigh(matrix)
        largest = float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0
        if float(eigenvalues[0]) < -1e-6 * largest:
            raise ValueError(
                f"{name} must be positive semi-definite, but its smallest eigenvalue is "
                f"{float(eigenvalues[0]):.3g} (largest {largest:.3g})"
            )
        if float(eigenvalues[0]) < 0:
            matrix = (vectors * eigenvalues.clamp(min=0)) @ vectors.T
        stats = cls(matrix.shape[0], damping=damping, name=name)
        stats._sum = matrix
        stats.nb_samples = 1
        stats._given = True
        return stats

    def update(self, inputs: object) -> InputStatistics:
        """Add the rows of ``inputs`` (``(..., input_dim)``, numpy or tensor, floating, finite).

        Accumulated in float64 ``_CHUNK`` rows at a time on the device of the first batch;
        returns ``self``. Raises naming :attr:`name` for a bad batch; the statistics are
        unchanged then. Statistics made by :meth:`from_covariance` take no samples.
        """
        if self._given:
            raise ValueError(
                f"{self.name}: statistics built from a covariance cannot take samples; "
                "accumulate samples in a new InputStatistics"
            )
        batch = _as_tensor(self.name, inputs)
        if batch.ndim == 0 or batch.shape[-1] != self.input_dim:
            raise ValueError(
                f"{self.name} must have shape (..., input_dim={self.input_dim}), "
                f"got shape {tuple(batch.shape)}"
            )
        rows = batch.reshape(-1, self.input_dim)
        if not torch.isfinite(rows).all():
            bad = int((~torch.isfinite(rows)).sum())
            raise ValueError(f"{self.name} must be finite, but {bad} entries are NaN or infinite")
        device = rows.device if self._sum is None else self._sum.device
        total = torch.zeros(self.input_dim, self.input_dim, dtype=torch.float64, device=device)
        for start in range(0, rows.shape[0], _CHUNK):
            chunk = rows[start : start + _CHUNK].to(device=device, dtype=torch.float64)
            total += chunk.T @ chunk
        self._sum = total if self._sum is None else self._sum + total
        self.nb_samples += rows.shape[0]
        self._cache.clear()
        return self

    @property
    def covariance(self) -> torch.Tensor:
        """The second moment ``C`` (``(input_dim, input_dim)``, float64, CPU); zeros if empty."""
        if self._sum is None or self.nb_samples == 0:
            return torch.zeros(self.input_dim, self.input_dim, dtype=torch.float64)
        moment = self._sum.to("cpu") / self.nb_samples
        return (moment + moment.T) / 2

    def damped_covariance(self) -> torch.Tensor:
        """``C + lambda I`` with ``lambda = damping * trace(C) / input_dim`` (float64, CPU).

        An all-zero ``C`` gives the identity (no sample says anything: the weight fit)."""
        self._whitening()
        return self._cache["damped"]

    def whitening_factor(self) -> torch.Tensor:
        """The symmetric ``S`` with ``S @ S = damped_covariance()`` (float64, CPU)."""
        return self._whitening()[0]

    def inverse_whitening_factor(self) -> torch.Tensor:
        """``S^{-1}``, finite for any data (eigenvalues floored, see ``_EIGENVALUE_FLOOR``)."""
        return self._whitening()[1]

    def _whitening(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "factor" not in self._cache:
            moment = self.covariance
            eigenvalues, vectors = torch.linalg.eigh(moment)
            eigenvalues = eigenvalues.clamp(min=0)
            trace = float(eigenvalues.sum())
            if trace <= 0:
                eigenvalues = torch.ones_like(eigenvalues)
            else:
                eigenvalues = eigenvalues + self.damping * trace / self.input_dim
                floor = _EIGENVALUE_FLOOR * float(eigenvalues.max())
                eigenvalues = eigenvalues.clamp(min=floor)
            root = eigenvalues.sqrt()
            self._cache["damped"] = (vectors * eigenvalues) @ vectors.T
            self._cache["factor"] = (vectors * root) @ vectors.T
            self._cache["inverse"] = (vectors / root) @ vectors.T
        return self._cache["factor"], self._cache["inverse"]

    def output_error(self, approximation: torch.Tensor, target: torch.Tensor) -> float:
        """:func:`output_relative_error` of ``approximation`` against ``target`` under ``C``."""
        return output_relative_error(approximation, target, self.covariance)

    def __repr__(self) -> str:
        return (
            f"InputStatistics(input_dim={self.input_dim}, nb_samples={self.nb_samples}, "
            f"damping={self.damping:g})"
        )


def output_relative_error(
    approximation: torch.Tensor, target: torch.Tensor, covariance: torch.Tensor
) -> float:
    """``sqrt(tr(E C E^T) / tr(W C W^T))`` with ``E = approximation - W`` and ``W = target``:
    ``||(W - W~) X^T||_F / ||W X^T||_F`` for the inputs whose second moment is ``C``.

    Float64; the absolute ``sqrt(tr(E C E^T))`` when ``W C W^T`` vanishes."""
    approximation = approximation.detach().to(device="cpu", dtype=torch.float64)
    target = target.detach().to(device="cpu", dtype=torch.float64)
    error = approximation - target
    numerator = max(float(((error @ covariance) * error).sum()), 0.0)
    denominator = max(float(((target @ covariance) * target).sum()), 0.0)
    if denominator > 0:
        return math.sqrt(numerator / denominator)
    return math.sqrt(numerator)


def as_input_statistics(
    input_dim: int,
    inputs: object = None,
    input_covariance: object = None,
    damping: float = DEFAULT_DAMPING,
) -> InputStatistics | None:
    """Statistics from ``inputs`` (``(n_samples, input_dim)``), ``input_covariance``
    (``(input_dim, input_dim)``) or an :class:`InputStatistics` given as either; ``None`` if
    neither is given. Raises ``TypeError``/``ValueError`` naming the argument."""
    if inputs is not None and input_covariance is not None:
        raise ValueError("pass either inputs or input_covariance, not both")
    damping = _check_damping(damping)
    given = inputs if inputs is not None else input_covariance
    name = "inputs" if inputs is not None else "input_covariance"
    if given is None:
        return None
    if isinstance(given, InputStatistics):
        if given.input_dim != input_dim:
            raise ValueError(
                f"{name} holds statistics of width {given.input_dim}, "
                f"but the matrix has input_dim={input_dim}"
            )
        if given.nb_samples == 0:
            raise ValueError(f"{name} holds no samples yet; call update() first")
        return given
    if inputs is not None:
        batch = _as_tensor("inputs", inputs)
        if batch.ndim != 2 or batch.shape[1] != input_dim:
            raise ValueError(
                f"inputs must have shape (n_samples, input_dim={input_dim}), "
                f"got shape {tuple(batch.shape)}"
            )
        if batch.shape[0] == 0:
            raise ValueError("inputs must hold at least one sample, got 0 rows")
        return InputStatistics(input_dim, damping=damping, name="inputs").update(batch)
    stats = InputStatistics.from_covariance(input_covariance, damping=damping)
    if stats.input_dim != input_dim:
        raise ValueError(
            f"input_covariance must have shape (input_dim, input_dim) = ({input_dim}, "
            f"{input_dim}), got shape ({stats.input_dim}, {stats.input_dim})"
        )
    return stats


def check_input_statistics(
    input_statistics: object, input_dim: int, target: torch.Tensor | None
) -> InputStatistics | None:
    """A layer constructor's ``input_statistics=`` argument, checked: ``None``, or an
    :class:`InputStatistics` of ``input_dim`` inputs given with the matrix to fit."""
    if input_statistics is None:
        return None
    if not isinstance(input_statistics, InputStatistics):
        raise TypeError(
            "input_statistics must be a structurednets.calibration.InputStatistics, "
            f"got {type(input_statistics).__name__}"
        )
    if input_statistics.input_dim != input_dim:
        raise ValueError(
            f"input_statistics has input_dim={input_statistics.input_dim}, the layer {input_dim}"
        )
    if target is None:
        raise ValueError("input_statistics needs an initial_weight_matrix to fit")
    return input_statistics
