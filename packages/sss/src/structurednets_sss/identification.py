"""System identification: an SSS approximation of a dense matrix from SVDs of its Hankel blocks.

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

import contextlib
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from structurednets.validation import (
    BudgetTooSmallError,
    as_matrix,
    check_dim,
    check_share,
    weight_budget,
)
from structurednets_sss.plan import (
    SSSPlan,
    StageOptions,
    block_sizes,
    check_options,
    clip_anticausal_dims,
    clip_causal_dims,
    even_plan,
    largest_uniform_state_dim,
    make_plan,
    stage_candidates,
)

__all__ = ["Identification", "identify", "identify_checked"]

# A candidate number of stages must beat the best so far by this relative margin (of the
# squared error) to be preferred: fewer stages are faster, so near-ties go to them.
_IMPROVEMENT = 2e-2
# Stop the search over numbers of stages after this many candidates without improvement.
_PATIENCE = 3
# A relative error below this counts as exact: the search stops there.
_EXACT = 1e-12


@dataclass(frozen=True)
class Identification:
    """The result of :func:`identify`.

    Attributes:
        plan: the sizes (stages, blocks, realised state dimensions).
        matrices: the stage matrices per kind (``"A"`` .. ``"G"``), float64 tensors, ``K`` each.
        squared_error: ``||W - W_sss||_F^2``, from the discarded singular values.
    """

    plan: SSSPlan
    matrices: dict[str, list[torch.Tensor]]
    squared_error: float


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


def _allocate(
    causal_spectra: list[torch.Tensor],
    anticausal_spectra: list[torch.Tensor],
    input_sizes: Sequence[int],
    output_sizes: Sequence[int],
    budget: int,
    causal_start: Sequence[int],
    anticausal_start: Sequence[int],
    tolerance: float,
) -> tuple[list[int], list[int]]:
    """Greedy state dimensions: add, one at a time, the state that removes the most squared
    singular value per parameter, while the budget lasts.

    A causal state at boundary ``p`` is limited by ``d_{p-1} + n_p`` (what the sweep can
    keep) and by the spectrum's length; singular values below ``tolerance`` are not worth a
    state. Dimensions start from ``causal_start``/``anticausal_start``.
    """
    K = len(input_sizes)
    dims = (list(causal_start), list(anticausal_start))
    spectra = (causal_spectra, anticausal_spectra)
    used = make_plan(input_sizes, output_sizes, *dims).nb_weight_parameters

    def neighbours(side: int, p: int) -> int:
        d = dims[side]
        return (d[p - 1] if p > 0 else 0) + (d[p + 1] if p < K - 2 else 0)

    def cost(side: int, p: int) -> int:
        if side == 0:
            return input_sizes[p] + output_sizes[p + 1] + neighbours(side, p)
        return input_sizes[p + 1] + output_sizes[p] + neighbours(side, p)

    def limit(side: int, p: int) -> int:
        d = dims[side]
        if side == 0:
            reachable = (d[p - 1] if p > 0 else 0) + input_sizes[p]
        else:
            reachable = (d[p + 1] if p < K - 2 else 0) + input_sizes[p + 1]
        return min(reachable, spectra[side][p].numel())

    # Entries: (-gain per parameter, side, boundary, dimension it would grow, its cost).
    heap: list[tuple[float, int, int, int, int]] = []

    def push(side: int, p: int) -> None:
        d = dims[side][p]
        if d < limit(side, p):
            sigma = float(spectra[side][p][d])
            if sigma > tolerance:
                c = cost(side, p)
                heapq.heappush(heap, (-(sigma**2) / c, side, p, d, c))

    for p in range(K - 1):
        push(0, p)
        push(1, p)
    while heap:
        _, side, p, d, c = heapq.heappop(heap)
        if d != dims[side][p]:
            continue  # stale: this state grew since the entry was pushed
        if c != cost(side, p):
            push(side, p)  # stale: the neighbours grew, so the state costs more now
            continue
        if used + c > budget:
            continue
        dims[side][p] += 1
        used += c
        push(side, p)
        # A neighbour's limit may have grown with this state.
        for q in (p - 1, p + 1):
            if 0 <= q < K - 1:
                push(side, q)
    return dims[0], dims[1]


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
    W: torch.Tensor, W_flipped: torch.Tensor, nb_stages: int, budget: int, options: StageOptions
) -> _Candidate | None:
    """The best realisation with ``nb_stages`` stages within ``budget``, or ``None``."""
    m, n = W.shape
    input_sizes = block_sizes(n, nb_stages)
    output_sizes = block_sizes(m, nb_stages)
    if options.causal_dims is not None or options.anticausal_dims is not None:
        causal = options.causal_dims if options.causal_dims is not None else options.anticausal_dims
        anticausal = options.anticausal_dims if options.anticausal_dims is not None else causal
        plan = even_plan(n, m, nb_stages, causal, anticausal)
        if plan.nb_weight_parameters > budget:
            return None
        return _realise(
            W, W_flipped, input_sizes, output_sizes, plan.causal_dims, plan.anticausal_dims
        )
    uniform = largest_uniform_state_dim(n, m, nb_stages, budget)
    if uniform < 0:
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
    starts = [
        ([0] * (nb_stages - 1), [0] * (nb_stages - 1)),
        (
            clip_causal_dims([uniform] * (nb_stages - 1), input_sizes, output_sizes),
            clip_anticausal_dims([uniform] * (nb_stages - 1), input_sizes, output_sizes),
        ),
    ]
    best = None
    for causal_start, anticausal_start in starts:
        causal, anticausal = _allocate(
            causal_spectra,
            anticausal_spectra,
            input_sizes,
            output_sizes,
            budget,
            causal_start,
            anticausal_start,
            tolerance,
        )
        candidate = _realise(W, W_flipped, input_sizes, output_sizes, causal, anticausal)
        if best is None or candidate.squared_error < best.squared_error:
            best = candidate
    return best


def identify(
    W: object,
    nb_params_share: float,
    *,
    nb_states: int | None = None,
    state_dim: int | Sequence[int] | None = None,
    anticausal_state_dim: int | Sequence[int] | None = None,
) -> Identification:
    """An SSS approximation of the matrix ``W`` (array or tensor, output_dim x input_dim) with
    at most ``floor(nb_params_share * W.size)`` stage-matrix scalars.

    The options are those of :class:`~structurednets_sss.SSSLayer`; what they leave open (the
    number of stages, the state dimensions) is chosen to minimise the Frobenius error. Raises
    :class:`BudgetTooSmallError` when nothing fits.

    >>> fitted = identify(torch.eye(64), 0.1)
    >>> fitted.plan.nb_stages, fitted.squared_error
    (12, 0.0)
    """
    if not hasattr(W, "shape") or len(W.shape) != 2:
        raise TypeError(f"W must be a 2-D array or tensor, got {type(W).__name__}")
    output_dim, input_dim = (
        check_dim("output_dim", W.shape[0]),
        check_dim("input_dim", W.shape[1]),
    )
    W = as_matrix("W", W, output_dim, input_dim)
    nb_params_share = check_share(nb_params_share)
    options = check_options(input_dim, output_dim, nb_states, state_dim, anticausal_state_dim)
    budget = weight_budget(input_dim, output_dim, nb_params_share)
    return identify_checked(W, budget, options, nb_params_share)


def identify_checked(
    W: torch.Tensor, budget: int, options: StageOptions, nb_params_share: float
) -> Identification:
    """:func:`identify` for a checked float64 CPU matrix, budget and options.

    Runs on one thread (see :func:`_one_thread`).
    """
    with _one_thread():
        return _identify(W, budget, options, nb_params_share)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the setting.

    The sweeps are many small SVDs, which gain nothing from threads; on a machine whose cores
    are busy, multithreaded LAPACK waits for them and was measured 10 to 50 times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _identify(
    W: torch.Tensor, budget: int, options: StageOptions, nb_params_share: float
) -> Identification:
    m, n = W.shape
    W = W.detach().to(device="cpu", dtype=torch.float64).contiguous()
    W_flipped = W.flip(0, 1)
    if options.nb_stages is not None:
        candidates = [options.nb_stages]
    else:
        candidates = stage_candidates(n, m)
    exact = (_EXACT * float(torch.linalg.norm(W))) ** 2
    best: _Candidate | None = None
    misses = 0
    for nb_stages in candidates:
        candidate = _best_for_stages(W, W_flipped, nb_stages, budget, options)
        if candidate is None:
            continue
        if best is None or candidate.squared_error < best.squared_error * (1 - _IMPROVEMENT):
            best, misses = candidate, 0
        else:
            misses += 1
        if misses >= _PATIENCE or best.squared_error <= exact:
            break
    if best is None:
        raise _too_small(n, m, budget, options, nb_params_share, candidates)
    return _identification(best, W)


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
        if options.causal_dims is None and options.anticausal_dims is None:
            plan = even_plan(n, m, nb_stages, 0)
        else:
            causal = (
                options.causal_dims if options.causal_dims is not None else options.anticausal_dims
            )
            anticausal = options.anticausal_dims if options.anticausal_dims is not None else causal
            plan = even_plan(n, m, nb_stages, causal, anticausal)
        if cheapest is None or plan.nb_weight_parameters < cheapest.nb_weight_parameters:
            cheapest = plan
    assert cheapest is not None
    return BudgetTooSmallError(
        "sss", n, m, nb_params_share, cheapest.nb_weight_parameters, cheapest.describe()
    )


def _identification(candidate: _Candidate, W: torch.Tensor) -> Identification:
    causal, anticausal = candidate.causal, candidate.anticausal
    K = candidate.nb_stages
    row, col = _cuts(candidate.output_sizes), _cuts(candidate.input_sizes)
    matrices = {
        "D": [W[row[k] : row[k + 1], col[k] : col[k + 1]].clone() for k in range(K)],
        "A": causal.transitions,
        "B": causal.inputs,
        "C": causal.outputs,
        "E": anticausal.transitions,
        "F": anticausal.inputs,
        "G": anticausal.outputs,
    }
    plan = SSSPlan(
        candidate.input_sizes,
        candidate.output_sizes,
        tuple(b.shape[0] for b in causal.inputs[: K - 1]),
        tuple(f.shape[0] for f in anticausal.inputs[1:]),
    )
    return Identification(plan, matrices, candidate.squared_error)
