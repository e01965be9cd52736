import numpy as np
import pytest
import torch
from full_structure import FullLayer, full_nb_weight_parameters

import structurednets
from structurednets import (
    Approximation,
    BudgetTooSmallError,
    NoStructureFitsError,
    SkippedStructure,
    UnknownStructureError,
    approximate,
)


@pytest.fixture
def full_structure():
    structure = structurednets.register("full", FullLayer, full_nb_weight_parameters)
    yield structure
    structurednets.unregister("full")


def target_matrix(shape=(12, 9), seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def diagonal_error(W):
    """Independent: the best diagonal approximation keeps W's main diagonal."""
    rest = W.copy()
    np.fill_diagonal(rest, 0.0)
    return np.linalg.norm(rest) / np.linalg.norm(W)


def test_single_structure(diagonal_structure):
    W = target_matrix()
    result = approximate(W, "diag", 0.5)
    assert isinstance(result, Approximation) and result.ok
    assert result.structure == "diagonal" and result.nb_params_share == 0.5
    assert result.relative_error == pytest.approx(diagonal_error(W), rel=1e-6)
    assert result.nb_parameters == 9 == result.layer.get_nb_parameters()
    assert result.layer.bias is None and result.seconds >= 0
    assert result.tried == (dataclass_without_tried(result),)
    U = torch.randn(4, 9)
    torch.testing.assert_close(result.layer(U), U @ result.layer.to_dense().T)
    assert "diagonal at share 0.5: relative error" in str(result)


def dataclass_without_tried(result):
    import dataclasses

    return dataclasses.replace(result, tried=())


@pytest.mark.parametrize(
    "convert",
    [
        lambda W: W,
        lambda W: W.astype(np.float32),
        lambda W: torch.from_numpy(W),
        lambda W: torch.from_numpy(W).float(),
        lambda W: torch.from_numpy(W).T.contiguous().T,  # a non-contiguous view
    ],
    ids=["float64 array", "float32 array", "float64 tensor", "float32 tensor", "strided"],
)
def test_accepts_arrays_and_tensors(diagonal_structure, convert):
    W = target_matrix()
    result = approximate(convert(W), "diagonal", 0.5)
    assert result.relative_error == pytest.approx(diagonal_error(W), rel=1e-5)


def test_bias_dtype_and_exactness(diagonal_structure):
    W = np.diag([1.0, -2.0, 3.0])[:, :2]  # 3 x 2, exactly diagonal
    bias = np.array([0.5, 0.25, -1.0])
    result = approximate(W, "diagonal", 1.0, bias=bias, dtype=torch.float64)
    assert result.relative_error == 0.0
    assert result.nb_parameters == 2 + 3
    assert result.layer.diagonal.dtype == torch.float64
    np.testing.assert_array_equal(result.layer.bias.detach().numpy(), bias)
    half = approximate(W, "diagonal", 1.0, dtype=torch.bfloat16)
    assert half.layer.diagonal.dtype == torch.bfloat16
    assert half.relative_error == 0.0  # the entries are exact in bfloat16


def test_zero_matrix_gives_absolute_error(diagonal_structure):
    result = approximate(np.zeros((4, 4)), "diagonal", 0.5)
    assert result.relative_error == 0.0


def test_best_picks_the_most_accurate_and_records_the_others(diagonal_structure, full_structure):
    W = target_matrix()
    exact = approximate(W, ["diagonal", "full"], 1.0)
    assert exact.structure == "full" and exact.relative_error < 1e-6
    assert [each.structure for each in exact.tried] == ["diagonal", "full"]
    assert all(each.ok for each in exact.tried) and exact.skipped == ()

    cheap = approximate(W, ["full", "diag", "diagonal"], 0.5)  # aliases count once
    assert cheap.structure == "diagonal"
    assert [each.structure for each in cheap.tried] == ["full", "diagonal"]
    (skipped,) = cheap.skipped
    assert isinstance(skipped, SkippedStructure) and not skipped.ok
    assert skipped.structure == "full" and skipped.min_share == 1.0
    assert "'full' layer" in skipped.reason and "use nb_params_share >= 1" in skipped.reason


def test_best_ties_go_to_fewer_parameters(diagonal_structure, full_structure):
    W = np.eye(5)
    result = approximate(W, ["full", "diagonal"], 1.0)
    assert result.relative_error == 0.0 and result.structure == "diagonal"


def test_best_tries_every_installed_structure(diagonal_structure, full_structure):
    result = approximate(target_matrix(), "best", 1.0)
    assert [each.structure for each in result.tried] == structurednets.available()


def test_nothing_fits(diagonal_structure, full_structure):
    with pytest.raises(NoStructureFitsError) as info:
        approximate(target_matrix(), ["diagonal", "full"], 0.01)
    message = str(info.value)
    assert message.startswith("no structure fits a 12 x 9 matrix at nb_params_share=0.01: ")
    assert message.endswith("The smallest share that works for one of them is 0.0834")
    assert [each.structure for each in info.value.skipped] == ["diagonal", "full"]
    with pytest.raises(BudgetTooSmallError, match="use nb_params_share >= 0.0834"):
        approximate(target_matrix(), "diagonal", 0.01)  # a single structure raises its error


def test_a_failing_structure_is_skipped_when_choosing(diagonal_structure):
    class BrokenLayer(FullLayer):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("numerical trouble")

    structurednets.register("broken", BrokenLayer, full_nb_weight_parameters)
    try:
        result = approximate(target_matrix(), ["broken", "diagonal"], 1.0)
        assert result.structure == "diagonal"
        assert result.skipped[0].reason == "failed: RuntimeError: numerical trouble"
        with pytest.raises(RuntimeError, match="numerical trouble"):
            approximate(target_matrix(), "broken", 1.0)
    finally:
        structurednets.unregister("broken")


def test_options(diagonal_structure, full_structure):
    with pytest.raises(TypeError, match="unexpected keyword argument 'rank'"):
        approximate(target_matrix(), "diagonal", 0.5, rank=3)
    with pytest.raises(TypeError, match=r"options \['rank'\] apply to a single structure"):
        approximate(target_matrix(), "best", 0.5, rank=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'rank'"):
        approximate(target_matrix(), "best", 0.5, structure_options={"diag": {"rank": 3}})
    with pytest.raises(TypeError, match=r"structure_options\['diag'\] must be a dict"):
        approximate(target_matrix(), "best", 0.5, structure_options={"diag": 3})


@pytest.mark.parametrize(
    ("matrix", "error", "message"),
    [
        ([[1.0, 2.0]], TypeError, "matrix must be a 2-D numpy array or torch tensor"),
        (np.ones(3), ValueError, r"matrix must be a 2-D, non-empty matrix .* got shape \(3,\)"),
        (np.ones((2, 0)), ValueError, r"got shape \(2, 0\)"),
        (torch.ones(2, 2, 2), ValueError, r"got shape \(2, 2, 2\)"),
        (np.array([[1.0, np.nan]]), ValueError, "matrix must be finite"),
        (np.array([["a"]]), TypeError, "matrix must hold real numbers"),
    ],
)
def test_bad_matrix(diagonal_structure, matrix, error, message):
    with pytest.raises(error, match=message):
        approximate(matrix, "diagonal", 0.5)


def test_bad_arguments(diagonal_structure):
    W = target_matrix()
    with pytest.raises(ValueError, match=r"nb_params_share must be in \(0, 1\]"):
        approximate(W, "diagonal", 1.5)
    with pytest.raises(UnknownStructureError, match="Installed structures: diagonal"):
        approximate(W, "nosuch", 0.5)
    with pytest.raises(UnknownStructureError):
        approximate(W, ["diagonal", "nosuch"], 0.5)
    with pytest.raises(ValueError, match="at least one structure"):
        approximate(W, [], 0.5)
    with pytest.raises(TypeError, match="structure must be a structure name"):
        approximate(W, 3, 0.5)
    with pytest.raises(ValueError, match=r"bias must have shape \(12,\)"):
        approximate(W, "diagonal", 0.5, bias=np.ones(9))
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        approximate(W, "diagonal", 0.5, dtype=torch.int64)


def test_best_without_structures():
    if structurednets.available():
        pytest.skip("a plugin is installed in this environment")
    with pytest.raises(NoStructureFitsError, match="no structures are installed"):
        approximate(target_matrix(), "best", 0.5)


def test_format_error():
    from structurednets.approximation import format_error

    assert format_error(0.21437) == "    0.2144"
    assert format_error(0.0) == "    0.0000"
    assert format_error(8.5419e-5) == "  8.54e-05"
    assert format_error(float("inf")) == "       inf"


def test_max_cost_ratio_bounds_the_choice(diagonal_structure, full_structure):
    W = np.random.default_rng(0).standard_normal((12, 12))
    unbounded = structurednets.approximate(W, ["diagonal", "full"], 1.0)
    assert unbounded.structure == "full" and unbounded.cost_ratio == 1.0
    diagonal = next(each for each in unbounded.tried if each.structure == "diagonal")
    assert diagonal.cost_ratio == pytest.approx(12 / 144)
    bounded = structurednets.approximate(W, ["diagonal", "full"], 1.0, max_cost_ratio=0.5)
    assert bounded.structure == "diagonal"
    assert "over max_cost_ratio=0.5" in bounded.skipped[0].reason
    with pytest.raises(structurednets.approximation.CostTooHighError, match="costs 1x"):
        structurednets.approximate(W, "full", 1.0, max_cost_ratio=0.5)
    for bad, error in ((0, ValueError), (-1.0, ValueError), ("0.5", TypeError), (True, TypeError)):
        with pytest.raises(error, match="max_cost_ratio must be a positive number"):
            structurednets.approximate(W, "diagonal", 1.0, max_cost_ratio=bad)


def test_compress_never_makes_a_layer_costlier_by_default(diagonal_structure, full_structure):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    small, report = structurednets.compress(model, "full", 1.0)
    assert isinstance(small[0], FullLayer) and report.layers[0].cost_ratio == 1.0
    _, report = structurednets.compress(model, "full", 1.0, max_cost_ratio=0.5)
    assert not report.layers and "over max_cost_ratio=0.5" in report.skipped[0].reason
