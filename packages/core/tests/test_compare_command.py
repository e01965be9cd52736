"""The compare command and comparison library, with core alone (test-only structures).

Subprocess tests here cover what needs no installed structure (argument and file errors);
runs on a real plugin are in the lowrank package's tests.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from full_structure import FullLayer, full_nb_weight_parameters

import structurednets
from structurednets.approximation import format_error
from structurednets.cli import main
from structurednets.comparison import compare_structures, format_comparison_table


@pytest.fixture
def full_structure():
    structure = structurednets.register("full", FullLayer, full_nb_weight_parameters)
    yield structure
    structurednets.unregister("full")


def test_compare_structures_rows(diagonal_structure, full_structure):
    W = np.random.default_rng(0).standard_normal((10, 8))
    lines = []
    rows = compare_structures(
        W, [0.5, 1.0], ["full", "diag"], batch_size=4, repeats=2, progress=lines.append
    )
    assert [(row.structure, row.nb_params_share) for row in rows] == [
        ("full", 0.5),
        ("full", 1.0),
        ("diagonal", 0.5),
        ("diagonal", 1.0),
    ]
    skipped, full, diagonal, _ = rows
    assert skipped.relative_error is None and skipped.forward_ratio is None
    assert "use nb_params_share >= 1" in skipped.skipped
    assert full.relative_error < 1e-6 and full.nb_parameters == 80
    assert full.dense_nb_parameters == 80 and (full.output_dim, full.input_dim) == (10, 8)
    expected = structurednets.approximate(W, "diagonal", 0.5)
    assert diagonal.relative_error == expected.relative_error
    assert diagonal.nb_parameters == expected.nb_parameters == 8
    assert diagonal.forward_ratio > 0 and diagonal.forward_ms > 0 and diagonal.batch_size == 4
    assert len(lines) == 4 and lines[0].startswith("full at share 0.5: skipped, ")

    table = format_comparison_table(rows).splitlines()
    assert table[0].split() == [
        "structure", "share", "params", "rel.", "error", "fit", "s", "fwd", "ms", "dense", "ms",
        "fwd", "ratio", "fwd", "cost",
    ]  # fmt: skip
    assert table[2].split() == ["full", "0.5", "-", "-", "-", "-", "-", "-", "-"]
    assert diagonal.forward_cost_ratio == 8 / 80  # 8 multiply-adds per row against 80
    assert table[4].split()[-1] == "0.100"
    assert table[4].split()[:4] == [
        "diagonal",
        "0.5",
        "8",
        format_error(expected.relative_error).strip(),
    ]
    assert table[6].startswith("full at share 0.5: nb_params_share=0.5 allows 40 weight")


def test_compare_command_json_matches_the_library(diagonal_structure, tmp_path, capsys):
    W = np.random.default_rng(1).standard_normal((16, 12))
    path = tmp_path / "W.npy"
    np.save(path, W)
    argv = ["compare", str(path), "--structures", "diag", "--shares", "0.05", "0.5", "--json"]
    code = main([*argv, "--batch", "8", "--repeats", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --json implies no progress lines
    rows = json.loads(captured.out)
    assert [(row["structure"], row["nb_params_share"]) for row in rows] == [
        ("diagonal", 0.05),
        ("diagonal", 0.5),
    ]
    assert "use nb_params_share >= 0.0625" in rows[0]["skipped"]
    expected = structurednets.approximate(W, "diagonal", 0.5)
    assert rows[1]["relative_error"] == expected.relative_error
    assert rows[1]["nb_parameters"] == expected.nb_parameters
    assert rows[1]["forward_ratio"] > 0 and rows[1]["batch_size"] == 8


def test_compare_command_reads_a_state_dict(diagonal_structure, tmp_path, capsys):
    linear = torch.nn.Linear(6, 5)
    path = tmp_path / "model.pt"
    torch.save({"layer.weight": linear.weight, "layer.bias": linear.bias}, path)
    argv = ["compare", str(path), "--key", "layer.weight", "--structures", "diagonal"]
    assert main([*argv, "--shares", "1", "--no-timing"]) == 0
    captured = capsys.readouterr()
    row = captured.out.splitlines()[2].split()
    expected = structurednets.approximate(linear.weight, "diagonal", 1.0)
    error = format_error(expected.relative_error).strip()
    assert row == ["diagonal", "1", "5", error, row[4], "0.167"]  # fwd cost: 5 of 30
    assert captured.err.startswith("comparing on a 5 x 6 matrix; forward timed against")


def error_cases(folder):
    """(argv, expected part of the one-line error) per case, with the files they need."""
    np.save(folder / "vector.npy", np.ones(5))
    np.save(folder / "objects.npy", np.array([{}, 1], dtype=object), allow_pickle=True)
    np.save(folder / "matrix.npy", np.ones((4, 3)))
    np.save(folder / "nan.npy", np.array([[1.0, np.nan]]))
    np.save(folder / "complex.npy", np.ones((2, 2), dtype=complex))
    (folder / "garbage.npy").write_text("not numpy")
    (folder / "garbage.pt").write_text("not torch")
    torch.save(torch.ones(2, 3, 4), folder / "cube.pt")
    torch.save(torch.nn.Linear(2, 2), folder / "module.pt")
    torch.save({"a.weight": torch.ones(2, 2), "a.bias": torch.ones(2)}, folder / "state.pt")
    matrix = str(folder / "matrix.npy")
    return {
        "missing file": (["compare", str(folder / "nope.npy")], "nope.npy: no such file"),
        "wrong extension": (["compare", str(folder)], "expected a .npy, .npz, .pt or .pth file"),
        "not numpy": (["compare", str(folder / "garbage.npy")], "not a .npy file"),
        "not torch": (["compare", str(folder / "garbage.pt")], "cannot read it as a .pt file"),
        "object array": (
            ["compare", str(folder / "objects.npy")],
            "Object arrays cannot be loaded",
        ),
        "1-D": (
            ["compare", str(folder / "vector.npy")],
            "holds an array of shape (5,); expected a 2-D matrix",
        ),
        "NaN": (
            ["compare", str(folder / "nan.npy")],
            "the matrix in " + str(folder / "nan.npy") + " must be finite, but 1 of its entries",
        ),
        "complex": (["compare", str(folder / "complex.npy")], "must hold real numbers"),
        "whole model": (
            ["compare", str(folder / "module.pt")],
            "holds Python objects other than tensors (a whole model?); save a tensor or a "
            "state_dict instead",
        ),
        "3-D": (["compare", str(folder / "cube.pt")], "holds an array of shape (2, 3, 4)"),
        "dict without key": (
            ["compare", str(folder / "state.pt")],
            "holds 2 arrays; pick one with --key (2-D ones: a.weight)",
        ),
        "unknown key": (
            ["compare", str(folder / "state.pt"), "--key", "b"],
            "no array named 'b'; it holds a.weight, a.bias",
        ),
        "share 0": (
            ["compare", matrix, "--shares", "0.1", "0"],
            "argument --shares: share must be a number in (0, 1], got '0'",
        ),
        "share 1.5": (["compare", matrix, "--shares", "1.5"], "got '1.5'"),
        "share nan": (["compare", matrix, "--shares", "nan"], "got 'nan'"),
        "batch": (["compare", matrix, "--batch", "0"], "expected a positive integer, got '0'"),
        "unknown structure": (
            ["compare", matrix, "--structures", "nosuch"],
            "unknown structure 'nosuch'. Installed structures:",
        ),
        "no matrix": (["compare"], "the following arguments are required: MATRIX"),
        "plot folder": (
            ["compare", matrix, "--plot", str(folder / "no" / "plot.png")],
            "does not exist",
        ),
    }


def check_one_line_error(code, out, err, expected):
    assert code == 2, err
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("structurednets"), err
    assert expected in err, err
    assert "Traceback" not in err


ERROR_CASES = [
    "missing file", "wrong extension", "not numpy", "not torch", "object array", "1-D", "NaN",
    "complex", "whole model", "3-D",
    "dict without key", "unknown key", "share 0", "share 1.5", "share nan", "batch",
    "unknown structure", "no matrix", "plot folder",
]  # fmt: skip


@pytest.mark.parametrize("case", ERROR_CASES)
def test_compare_errors_are_one_line(tmp_path, capsys, case):
    argv, expected = error_cases(tmp_path)[case]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's usage errors exit
        code = exit.code
    captured = capsys.readouterr()
    check_one_line_error(code, captured.out, captured.err, expected)


@pytest.mark.slow  # a new Python process
def test_compare_errors_from_the_command_line(tmp_path):
    """A few of the errors above, as a user meets them: a fresh interpreter each, run at once."""
    cases = error_cases(tmp_path)
    names = ["missing file", "1-D", "unknown structure"]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "structurednets", *cases[name][0]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    # --plot without matplotlib: hide it from the interpreter
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from structurednets.cli import main\n"
        f"raise SystemExit(main(['compare', {str(tmp_path / 'matrix.npy')!r}, "
        f"'--plot', {str(tmp_path / 'plot.png')!r}]))"
    )
    runs.append(
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    expected = [cases[name][1] for name in names]
    expected.append("--plot: plotting needs matplotlib: pip install 'structurednets[plot]'")
    for run, message in zip(runs, expected, strict=True):
        out, err = run.communicate(timeout=120)
        check_one_line_error(run.returncode, out, err, message)


def test_compare_with_inputs_adds_the_output_error(diagonal_structure, tmp_path, capsys):
    rng = np.random.default_rng(3)
    W, X = rng.standard_normal((10, 8)), rng.standard_normal((50, 8)) * np.arange(1, 9)
    np.save(tmp_path / "matrix.npy", W)
    np.save(tmp_path / "inputs.npy", X)
    argv = ["compare", str(tmp_path / "matrix.npy"), "--structures", "diag", "--no-timing"]
    assert main([*argv, "--shares", "0.5", "--inputs", str(tmp_path / "inputs.npy")]) == 0
    table = capsys.readouterr().out
    assert "out error" in table.splitlines()[0]
    expected = structurednets.approximate(W, "diag", 0.5, inputs=X).output_relative_error
    assert format_error(expected).strip() in table
    (row,) = compare_structures(W, [0.5], ["diag"], time_forward=False, inputs=X)
    assert row.output_relative_error == pytest.approx(expected)
    assert "out error" in format_comparison_table([row])
    np.save(tmp_path / "narrow.npy", X[:, :5])
    assert main([*argv, "--inputs", str(tmp_path / "narrow.npy")]) == 2
    assert "inputs must have shape (n_samples, input_dim=8)" in capsys.readouterr().err
    assert main([*argv, "--inputs", str(tmp_path / "missing.npy")]) == 2
    assert "--inputs:" in capsys.readouterr().err
