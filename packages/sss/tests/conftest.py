"""Helpers the SSS test modules share, as fixtures (test modules do not import each other)."""

import numpy as np
import pytest


def _random_stage_matrices(input_sizes, output_sizes, causal, anticausal, seed=0):
    """Stage matrices (numpy, per kind, ``K`` each) of the given sizes; zero-size at the ends.

    The transitions are scaled by 1/2 so that products along many stages stay moderate.
    """
    rng = np.random.default_rng(seed)
    K = len(input_sizes)
    dx = [0, *causal, 0]
    dz = [0, *anticausal, 0]  # dz[k + 1] = dim z_k
    return {
        "D": [rng.standard_normal((output_sizes[k], input_sizes[k])) for k in range(K)],
        "A": [rng.standard_normal((dx[k + 1], dx[k])) / 2 for k in range(K)],
        "B": [rng.standard_normal((dx[k + 1], input_sizes[k])) for k in range(K)],
        "C": [rng.standard_normal((output_sizes[k], dx[k])) for k in range(K)],
        "E": [rng.standard_normal((dz[k], dz[k + 1])) / 2 for k in range(K)],
        "F": [rng.standard_normal((dz[k], input_sizes[k])) for k in range(K)],
        "G": [rng.standard_normal((output_sizes[k], dz[k + 1])) for k in range(K)],
    }


def _weight_count(input_sizes, output_sizes, causal, anticausal):
    """Weight scalars of an SSS layer of these sizes, summed by hand from the stage shapes:
    ``D_k``, then per boundary the rows of ``B``/``F`` and columns of ``C``/``G``, then the
    transitions between neighbouring boundaries."""
    total = sum(m * n for m, n in zip(output_sizes, input_sizes, strict=True))
    for p in range(len(input_sizes) - 1):
        total += causal[p] * (input_sizes[p] + output_sizes[p + 1])
        total += anticausal[p] * (input_sizes[p + 1] + output_sizes[p])
    for p in range(len(input_sizes) - 2):
        total += causal[p] * causal[p + 1] + anticausal[p] * anticausal[p + 1]
    return total


@pytest.fixture
def random_stage_matrices():
    """``random_stage_matrices(input_sizes, output_sizes, causal, anticausal, seed=0)``."""
    return _random_stage_matrices


@pytest.fixture
def weight_count():
    """``weight_count(input_sizes, output_sizes, causal, anticausal)``."""
    return _weight_count
