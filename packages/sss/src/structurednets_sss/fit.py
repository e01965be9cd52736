"""The SSS fit (system identification): an SSS approximation of a dense matrix from SVDs of
its Hankel blocks; :func:`fit_sss` is the entry point.

The causal (strictly lower block) part is realised in one sweep over the stages, as in
Dewilde & van der Veen, *Time-Varying Systems and Computations* (1998), ch. 3, and
Chandrasekaran et al., *Some fast algorithms for sequentially semiseparable representations*
(SIAM J. Matrix Anal. Appl. 27, 2005). At boundary ``p`` the Hankel block
``H_p = W[rows after p, cols up to p]`` is represented by ``O_p R_p`` with ``R_p`` having
orthonormal rows, so that ``H_{p+1} = [O_p (rows after p+1) | W[rows after p+1, block p+1]]
diag(R_p, I)`` and the SVD of the small left factor ``M_{p+1}`` gives the state of the next
boundary: ``[A B] = V^T`` (orthonormal rows again), ``O_{p+1} = U S`` and ``C`` the rows of
``O`` that belong to the next output block. Truncating each SVD to the state dimension
discards exactly the discarded singular values: the squared Frobenius error of the causal part
is the sum of the squared discarded singular values of all the ``M_p``. The anticausal part
is the causal part of the matrix with rows and columns reversed.

The state dimensions are chosen from the singular values of the Hankel blocks, which one
untruncated (capped) sweep yields: a state at a boundary costs ``n_p + m_{p+1} + d_{p-1} +
d_{p+1}`` parameters and removes ``sigma^2`` from the error estimate, and a greedy allocation
by removed error per parameter fills the budget. Two allocations are realised (greedy from
zero, and greedy on top of the largest uniform dimension, which wins on matrices with flat
spectra) and the one with the smaller actual error is kept. The number of stages is searched
over powers of two and three times powers of two, smallest first, until the error stops
improving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from structurednets.plugin import (
    BudgetTooSmallError,
    as_matrix,
    check_dim,
    check_positive_int,
    torch_threads,
)
from structurednets_sss.allocation import StateAllocation
from structurednets_sss.layout import (
    SSSSizes,
    block_sizes,
    check_cost_bound,
    check_max_cost_ratio,
    clip_anticausal_dims,
    clip_causal_dims,
    cost_ratio,
    even_sizes,
    largest_uniform_state_dim,
    requested_sizes,
    stage_candidates,
)
from structurednets_sss.options import StageOptions, check_options
from structurednets_sss.system import SSSSystem

__all__ = ["SSSFit", "fit_sss"]

# A candidate number of stages must beat the best so far by this relative margin (of the
# squared error) to be preferred: fewer stages are faster, so near-ties go to them.
_IMPROVEMENT = 2e-2
# Stop the search over numbers of stages after this many candidates without improvement.
_PATIENCE = 3
# Steps of the bisection that fits a state allocation under a cost bound.
_BISECTIONS = 16
# A relative error below this counts as exact: the search stops there.
_EXACT = 1e-12


@dataclass(frozen=True)
class SSSFit:
    """The result of :func:`fit_sss`.

    Attributes:
        system: the fitted stage matrices (float64 tensors), an :class:`SSSSystem`.
        squared_error: ``||W - W_sss||_F^2``, from the discarded singular values.
    """

    system: SSSSystem
    squared_error: float

    @property
    def sizes(self) -> SSSSizes:
        """The sizes of the fitted system: stages, blocks, realised state dimensions."""
        return self.system.sizes()


@dataclass(frozen=True)
class _Part:
    """One part (causal, or anticausal via the flipped matrix) realised by a sweep."""

    transitions: list[torch.Tensor]  # A_k, k = 0 .. K-1
    inputs: list[torch.Tensor]  # B_k
    outputs: list[torch.Tensor]  # C_k
    squared_error: float
    singular_values: list[torch.Tensor]  # of M_p, p = 0 .. K-2


def _cuts(sizes: Sequence[int]) -> list[int]:
    cuts = [0]
    for size in sizes:
        cuts.append(cuts[-1] + int(size))
    return cuts


def _sweep(
    W: torch.Tensor,
    output_sizes: Sequence[int],
    input_sizes: Sequence[int],
    dims: Sequence[int],
    realise: bool = True,
) -> _Part:
    """Realise the strictly lower block part of ``W`` with states truncated to ``dims``."""
    K = len(input_sizes)
    row, col = _cuts(output_sizes), _cuts(input_sizes)
    observability = W.new_zeros(W.shape[0], 0)  # O: rows of the stages from the current one on
    transitions, inputs, outputs, spectra = [], [], [], []
    squared_error = 0.0
    for p in range(K - 1):
        below = slice(row[p + 1], row[-1])
        if realise:
            outputs.append(observability[row[p] : row[p + 1]].clone())
        left = torch.cat([observability[below], W[below, col[p] : col[p + 1]]], dim=1)
        u, s, vt = torch.linalg.svd(left, full_matrices=False)
        keep = min(dims[p], s.numel())
        squared_error += float(torch.sum(s[keep:] ** 2))
        spectra.append(s)
        if realise:
            previous = observability.shape[1]
            transitions.append(vt[:keep, :previous])
            inputs.append(vt[:keep, previous:])
        observability = W.new_zeros(W.shape[0], keep)
        observability[below] = u[:, :keep] * s[:keep]
    if realise:
        outputs.append(observability[row[K - 1] :].clone())
        transitions.append(W.new_zeros(0, observability.shape[1]))
        inputs.append(W.new_zeros(0, input_sizes[K - 1]))
    return _Part(transitions, inputs, outputs, squared_error, spectra)


def _flipped_sweep(
    W_flipped: torch.Tensor,
    output_sizes: Sequence[int],
    input_sizes: Sequence[int],
    dims: Sequence[int],
    realise: bool = True,
) -> _Part:
    """The anticausal part of ``W``: the causal part of ``W[::-1, ::-1]``, mapped back.

    ``dims`` are the anticausal dimensions of ``W`` per boundary (``dim z_p``); the returned
    lists are per stage of ``W`` (``E_k``, ``F_k``, ``G_k``) and its spectra per boundary.
    """
    part = _sweep(W_flipped, output_sizes[::-1], input_sizes[::-1], dims[::-1], realise)
    if not realise:
        return _Part([], [], [], part.squared_error, part.singular_values[::-1])
    # Stage k of W is stage K-1-k of the flipped matrix, whose blocks run backwards.
    return _Part(
        transitions=part.transitions[::-1],
        inputs=[b.flip(1) for b in part.inputs[::-1]],
        outputs=[c.flip(0) for c in part.outputs[::-1]],
        squared_error=part.squared_error,
        singular_values=part.singular_values[::-1],
    )


@dataclass
class _Candidate:
    nb_stages: int
    causal: _Part
    anticausal: _Part
    input_sizes: tuple[int, ...]
    output_sizes: tuple[int, ...]

    @property
    def squared_error(self) -> float:
        return self.causal.squared_error + self.anticausal.squared_error

    @property
    def sizes(self) -> SSSSizes:
        dims = (
            [len(b) for b in self.causal.inputs[:-1]],
            [len(f) for f in self.anticausal.inputs[1:]],
        )
        return SSSSizes(self.input_sizes, self.output_sizes, tuple(dims[0]), tuple(dims[1]))


def _realise(
    W: torch.Tensor,
    W_flipped: torch.Tensor,
    input_sizes: tuple[int, ...],
    output_sizes: tuple[int, ...],
    causal: Sequence[int],
    anticausal: Sequence[int],
) -> _Candidate:
    return _Candidate(
        len(input_sizes),
        _sweep(W, output_sizes, input_sizes, causal),
        _flipped_sweep(W_flipped, output_sizes, input_sizes, anticausal),
        input_sizes,
        output_sizes,
    )


def _best_for_stages(
    W: torch.Tensor,
    W_flipped: torch.Tensor,
    nb_stages: int,
    budget: int,
    options: StageOptions,
    max_cost_ratio: float | None = None,
) -> _Candidate | None:
    """The best realisation with ``nb_stages`` stages within ``budget`` and the cost bound,
    or ``None``."""
    m, n = W.shape
    input_sizes = block_sizes(n, nb_stages)
    output_sizes = block_sizes(m, nb_stages)

    def affordable(sizes: SSSSizes) -> bool:
        return max_cost_ratio is None or cost_ratio(sizes) <= max_cost_ratio

    if options.causal_dims is not None or options.anticausal_dims is not None:
        sizes = requested_sizes(n, m, nb_stages, options)
        if sizes.nb_weight_parameters > budget or not affordable(sizes):
            return None
        return _realise(
            W, W_flipped, input_sizes, output_sizes, sizes.causal_dims, sizes.anticausal_dims
        )
    uniform = largest_uniform_state_dim(n, m, nb_stages, budget)
    if uniform < 0 or not affordable(even_sizes(n, m, nb_stages, 0)):
        return None
    if nb_stages == 1:
        return _realise(W, W_flipped, input_sizes, output_sizes, (), ())
    cap = min(2 * uniform + 8, m, n)
    caps = [cap] * (nb_stages - 1)
    causal_spectra = _sweep(W, output_sizes, input_sizes, caps, realise=False).singular_values
    anticausal_spectra = _flipped_sweep(
        W_flipped, output_sizes, input_sizes, caps, realise=False
    ).singular_values
    tolerance = 1e-13 * float(torch.linalg.norm(W))

    def allocate(start, allowed: int) -> tuple[list[int], list[int]]:
        allocation = StateAllocation(
            (causal_spectra, anticausal_spectra), input_sizes, output_sizes, start, tolerance
        )
        return allocation.run(allowed)

    def sizes_of(dims) -> SSSSizes:
        return SSSSizes(input_sizes, output_sizes, tuple(dims[0]), tuple(dims[1]))

    zero = ([0] * (nb_stages - 1), [0] * (nb_stages - 1))
    starts = [
        zero,
        (
            clip_causal_dims([uniform] * (nb_stages - 1), input_sizes, output_sizes),
            clip_anticausal_dims([uniform] * (nb_stages - 1), input_sizes, output_sizes),
        ),
    ]
    best = None
    for start in starts:
        dims = allocate(start, budget)
        if not affordable(sizes_of(dims)):
            if start is not zero:
                continue  # the uniform start alone may be too costly; the greedy one adapts
            # The largest parameter budget whose allocation the bound affords (bisection).
            low, high = even_sizes(n, m, nb_stages, 0).nb_weight_parameters, budget
            dims = allocate(start, low)
            for _ in range(_BISECTIONS):
                if high - low <= 1:
                    break
                middle = (low + high) // 2
                trial = allocate(start, middle)
                if affordable(sizes_of(trial)):
                    low, dims = middle, trial
                else:
                    high = middle
        candidate = _realise(W, W_flipped, input_sizes, output_sizes, *dims)
        if best is None or _better(candidate, best):
            best = candidate
    return best


def _better(candidate: _Candidate, best: _Candidate) -> bool:
    """Whether ``candidate`` beats ``best``: a smaller squared error, or one within the
    improvement margin at a smaller padded cost (the kernel's speed)."""
    if candidate.squared_error < best.squared_error * (1 - _IMPROVEMENT):
        return True
    if candidate.squared_error > best.squared_error * (1 + _IMPROVEMENT):
        return False
    return candidate.sizes.padded_nb_parameters < best.sizes.padded_nb_parameters


def fit_sss(
    matrix: object,
    budget: int,
    *,
    nb_stages: int | None = None,
    nb_states: int | None = None,
    state_dim: int | Sequence[int] | None = None,
    anticausal_state_dim: int | Sequence[int] | None = None,
    input_sizes: Sequence[int] | None = None,
    output_sizes: Sequence[int] | None = None,
    causal_dims: Sequence[int] | None = None,
    anticausal_dims: Sequence[int] | None = None,
    max_cost_ratio: float | None = None,
) -> SSSFit:
    """An SSS approximation of ``matrix`` (array or tensor, ``(output_dim, input_dim)``) with
    at most ``budget`` stage-matrix scalars.

    The options are those of :class:`~structurednets_sss.SSSLayer`; what they leave open (the
    number of stages, the state dimensions) is chosen to minimise the Frobenius error. With
    the exact sizes of a layout (``input_sizes`` .. ``anticausal_dims``) the fit has exactly
    those sizes. ``max_cost_ratio`` bounds the layer's ``cost_ratio()`` (forward and
    backward multiply-adds at batch 256 against ``nn.Linear``): layouts above it are not
    considered. Raises :class:`BudgetTooSmallError` when nothing fits the budget, and
    ``ValueError`` naming the smallest ratio reachable when nothing fits the bound.

    >>> fitted = fit_sss(torch.eye(64), 409)
    >>> fitted.sizes.nb_stages, fitted.squared_error
    (12, 0.0)
    """
    if not hasattr(matrix, "shape") or len(matrix.shape) != 2:
        raise TypeError(f"matrix must be a 2-D array or tensor, got {type(matrix).__name__}")
    output_dim = check_dim("output_dim", matrix.shape[0])
    input_dim = check_dim("input_dim", matrix.shape[1])
    W = as_matrix("matrix", matrix, output_dim, input_dim)
    budget = check_positive_int("budget", budget)
    options = check_options(
        input_dim,
        output_dim,
        nb_stages=nb_stages,
        nb_states=nb_states,
        state_dim=state_dim,
        anticausal_state_dim=anticausal_state_dim,
        input_sizes=input_sizes,
        output_sizes=output_sizes,
        causal_dims=causal_dims,
        anticausal_dims=anticausal_dims,
    )
    return fit_checked(
        W,
        budget,
        options,
        budget / (input_dim * output_dim),
        check_max_cost_ratio(max_cost_ratio),
    )


def fit_checked(
    W: torch.Tensor,
    budget: int,
    options: StageOptions,
    nb_params_share: float,
    max_cost_ratio: float | None = None,
) -> SSSFit:
    """:func:`fit_sss` for a checked float64 CPU matrix, budget and options
    (``nb_params_share`` only for the messages) and a checked ``max_cost_ratio``.

    The sweeps are many small SVDs, which gain nothing from threads; on a machine whose cores
    are busy, multithreaded LAPACK waits for them and was measured 10 to 50 times slower. So
    the fit runs on one torch thread, and restores the setting afterwards.
    """
    with torch_threads(1):
        return _fit(W, budget, options, nb_params_share, max_cost_ratio)


def _fit(
    W: torch.Tensor,
    budget: int,
    options: StageOptions,
    nb_params_share: float,
    max_cost_ratio: float | None,
) -> SSSFit:
    m, n = W.shape
    W = W.detach().to(device="cpu", dtype=torch.float64).contiguous()
    W_flipped = W.flip(0, 1)
    if options.exact is not None:
        check_cost_bound(options.exact, max_cost_ratio, "the given sizes")
        return _fit_exact(W, W_flipped, options.exact, budget, nb_params_share)
    if options.nb_stages is not None:
        candidates = [options.nb_stages]
    else:
        candidates = stage_candidates(n, m)
    exact = (_EXACT * float(torch.linalg.norm(W))) ** 2
    best: _Candidate | None = None
    misses = 0
    for nb_stages in candidates:
        candidate = _best_for_stages(W, W_flipped, nb_stages, budget, options, max_cost_ratio)
        if candidate is None:
            continue
        if best is None or candidate.squared_error < best.squared_error * (1 - _IMPROVEMENT):
            best, misses = candidate, 0
        else:
            misses += 1
        if misses >= _PATIENCE or best.squared_error <= exact:
            break
    if best is None:
        error = _too_small(n, m, budget, options, nb_params_share, candidates)
        if max_cost_ratio is None or error.needed > budget:
            raise error
        raise _too_costly(n, m, budget, options, candidates, max_cost_ratio)
    return SSSFit(SSSSystem(**_stage_matrices(best, W)), best.squared_error)


def _fit_exact(
    W: torch.Tensor, W_flipped: torch.Tensor, sizes: SSSSizes, budget: int, share: float
) -> SSSFit:
    """The fit with exactly ``sizes``: the sweeps truncate to its state dimensions, and a state
    larger than the rank its Hankel block has is padded with zeros (it carries nothing)."""
    m, n = W.shape
    if sizes.nb_weight_parameters > budget:
        raise BudgetTooSmallError(
            "sss", n, m, share, sizes.nb_weight_parameters, f"the given sizes ({sizes.describe()})"
        )
    candidate = _realise(
        W,
        W_flipped,
        sizes.input_sizes,
        sizes.output_sizes,
        sizes.causal_dims,
        sizes.anticausal_dims,
    )
    shapes = sizes.stage_shapes()
    matrices = {
        kind: [
            torch.nn.functional.pad(matrix, (0, cols - matrix.shape[1], 0, rows - matrix.shape[0]))
            for matrix, (rows, cols) in zip(stage, shapes[kind], strict=True)
        ]
        for kind, stage in _stage_matrices(candidate, W).items()
    }
    return SSSFit(SSSSystem(**matrices), candidate.squared_error)


def _least_sizes(n: int, m: int, nb_stages: int, options: StageOptions) -> SSSSizes:
    """The smallest sizes ``nb_stages`` stages take under ``options``: the requested state
    dimensions where some are given, else no states at all."""
    if options.causal_dims is None and options.anticausal_dims is None:
        return even_sizes(n, m, nb_stages, 0)
    return requested_sizes(n, m, nb_stages, options)


def _too_small(
    n: int,
    m: int,
    budget: int,
    options: StageOptions,
    nb_params_share: float,
    candidates: list[int],
) -> BudgetTooSmallError:
    """The error for a budget that no candidate fits, naming the cheapest candidate."""
    cheapest = None
    for nb_stages in candidates:
        sizes = _least_sizes(n, m, nb_stages, options)
        if cheapest is None or sizes.nb_weight_parameters < cheapest.nb_weight_parameters:
            cheapest = sizes
    assert cheapest is not None
    return BudgetTooSmallError(
        "sss", n, m, nb_params_share, cheapest.nb_weight_parameters, cheapest.describe()
    )


def _too_costly(
    n: int, m: int, budget: int, options: StageOptions, candidates: list[int], max_cost_ratio: float
) -> ValueError:
    """The error for a cost bound that no candidate meets, naming the cheapest candidate."""
    cheapest = None
    for nb_stages in candidates:
        sizes = _least_sizes(n, m, nb_stages, options)
        if sizes.nb_weight_parameters > budget:
            continue
        if cheapest is None or cost_ratio(sizes) < cost_ratio(cheapest):
            cheapest = sizes
    assert cheapest is not None
    return ValueError(
        f"max_cost_ratio={max_cost_ratio:g} is below the smallest cost ratio an SSS layer of "
        f"this shape reaches within the budget, {cost_ratio(cheapest):.4f} "
        f"({cheapest.describe()})"
    )


def _stage_matrices(candidate: _Candidate, W: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """The stage matrices of a realised candidate, per kind, ``K`` each."""
    causal, anticausal = candidate.causal, candidate.anticausal
    K = candidate.nb_stages
    row, col = _cuts(candidate.output_sizes), _cuts(candidate.input_sizes)
    return {
        "D": [W[row[k] : row[k + 1], col[k] : col[k + 1]].clone() for k in range(K)],
        "A": causal.transitions,
        "B": causal.inputs,
        "C": causal.outputs,
        "E": anticausal.transitions,
        "F": anticausal.inputs,
        "G": anticausal.outputs,
    }
