import math

import numpy as np
import pytest
import torch

from structurednets.validation import (
    BudgetTooSmallError,
    as_matrix,
    check_dim,
    check_share,
    smallest_share,
    weight_budget,
)


@pytest.mark.parametrize("value", [0, -1])
def test_dims_must_be_positive(value):
    with pytest.raises(ValueError, match=f"input_dim must be a positive integer, got {value}"):
        check_dim("input_dim", value)


@pytest.mark.parametrize("value", [2.0, "3", None, True, np.float64(4)])
def test_dims_must_be_integers(value):
    with pytest.raises(TypeError, match="input_dim must be a positive integer"):
        check_dim("input_dim", value)


def test_numpy_integers_are_dims():
    assert check_dim("input_dim", np.int64(5)) == 5


@pytest.mark.parametrize("value", [0, -0.1, 1.0000001, math.nan, math.inf])
def test_share_outside_unit_interval(value):
    with pytest.raises(ValueError, match="nb_params_share must be in \\(0, 1\\]"):
        check_share(value)


def test_budget_is_floor_with_float_slack():
    assert weight_budget(100, 1, 0.29) == 29  # 0.29 * 100 = 28.999999999999996
    assert weight_budget(2048, 2048, 0.1) == 419430
    assert weight_budget(3, 3, 1.0) == 9


@pytest.mark.parametrize(
    ("needed", "size"), [(1, 9), (130, 4096), (7, 7 * 13), (419431, 2048 * 2048)]
)
def test_smallest_share_fits_and_is_close(needed, size):
    share = smallest_share(needed, size, 1)
    assert weight_budget(size, 1, share) >= needed
    assert share - needed / size <= 0.01 * needed / size + 1e-15


def test_budget_error_message():
    error = BudgetTooSmallError("sss", 64, 32, 0.001, 130, "2 stages")
    assert str(error) == (
        "nb_params_share=0.001 allows 2 weight parameters for a 32 x 64 (output_dim x input_dim) "
        "'sss' layer, but 2 stages needs 130; use nb_params_share >= 0.0635"
    )
    assert error.min_share == 0.0635
    impossible = BudgetTooSmallError("sss", 2, 2, 0.5, 5)
    assert "no share does" in str(impossible)


def test_as_matrix_converts_and_copies():
    source = np.arange(6, dtype=np.int32).reshape(2, 3)
    matrix = as_matrix("W", source, 2, 3)
    assert matrix.dtype == torch.float64 and matrix.shape == (2, 3)
    tensor = torch.ones(2, 3, dtype=torch.float32, requires_grad=True)
    converted = as_matrix("W", tensor, 2, 3)
    assert not converted.requires_grad
    converted[0, 0] = 5
    assert tensor[0, 0] == 1


def test_as_matrix_rejects_complex_and_bool():
    with pytest.raises(TypeError, match="W must hold real numbers"):
        as_matrix("W", np.ones((2, 2), dtype=complex), 2, 2)
    with pytest.raises(TypeError, match="W must hold real numbers"):
        as_matrix("W", torch.ones(2, 2, dtype=torch.bool), 2, 2)


def test_as_matrix_takes_reversed_and_empty_views():
    reversed_view = np.arange(6.0).reshape(2, 3)[::-1, ::-1]
    assert as_matrix("W", reversed_view, 2, 3)[0, 0] == 5
    empty_view = np.ones((3, 3))[::-1, ::-1][:, :0]
    assert as_matrix("W", empty_view, 3, 0).shape == (3, 0)


@pytest.mark.slow  # parses the whole standard library
def test_stdlib_sentences_are_prose_and_the_parts_disjoint():
    from structurednets.datasets import split_sentences, stdlib_sentences

    text = "Return the sum of a and b, rounded.\n\n    >>> add(1, 2)\n    3\n\nSee also mul.  It x."
    expected = ["Return the sum of a and b, rounded.", "See also mul."]  # not code, not "It x."
    assert split_sentences(text, min_words=3) == expected
    parts = {
        name: set(stdlib_sentences(name)) for name in ("calibration", "training", "evaluation")
    }
    assert all(len(sentences) > 200 for sentences in parts.values())
    assert not parts["calibration"] & parts["evaluation"]
    assert not parts["training"] & parts["evaluation"]
    assert set().union(*parts.values()) == set(stdlib_sentences())
