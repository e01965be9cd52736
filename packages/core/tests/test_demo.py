import dataclasses

import pytest

import structurednets
from structurednets.cli import main
from structurednets.demo import HIDDEN, format_demo_table, run_demo
from structurednets.testing import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    """Training is reproducible and fastest on this busy machine with one thread."""
    with torch_threads(1):
        yield


def without_times(rows):
    return [dataclasses.replace(row, fit_seconds=0.0, finetune_seconds=0.0) for row in rows]


def test_run_demo_rows(diagonal_structure):
    lines = []
    rows = run_demo(["diag"], shares=[0.5, 0.002], epochs=2, seed=0, progress=lines.append)
    dense, diagonal, skipped = rows
    assert dense.structure == "dense" and dense.nb_parameters == HIDDEN * HIDDEN + HIDDEN
    assert dense.model_nb_parameters == 64 * 256 + 256 + HIDDEN * HIDDEN + HIDDEN + 256 * 10 + 10
    assert (diagonal.structure, diagonal.nb_params_share) == ("diagonal", 0.5)
    assert diagonal.nb_parameters == HIDDEN + HIDDEN
    assert diagonal.model_nb_parameters == dense.model_nb_parameters - HIDDEN * HIDDEN + HIDDEN
    assert 0 < diagonal.relative_error < 1
    assert 0 <= diagonal.accuracy_fitted <= 1 and 0 <= diagonal.accuracy_finetuned <= 1
    assert skipped.skipped.startswith("nb_params_share=0.002 allows 131 weight parameters")
    assert skipped.accuracy_finetuned is None
    assert lines[0].startswith("training a 64-256-256-10 MLP on 1348 digits")
    assert lines[2].startswith("[1/2] diagonal at share 0.5: fitted in ")
    assert lines[4].startswith("[2/2] diagonal at share 0.002: skipped, ")

    table = format_demo_table(rows).splitlines()
    assert table[2].split()[:4] == ["dense", "1", "65792", "85002"]
    assert table[3].split()[:4] == ["diagonal", "0.5", "512", "19722"]
    assert table[4].split() == ["diagonal", "0.002"] + ["-"] * 7
    assert table[5].startswith("diagonal at share 0.002: nb_params_share=0.002 allows 131")


def test_demo_is_reproducible(diagonal_structure):
    first = run_demo(["diagonal"], shares=[0.5], epochs=1, seed=3)
    second = run_demo(["diagonal"], shares=[0.5], epochs=1, seed=3)
    assert without_times(first) == without_times(second)


def test_demo_command_table_and_plot(diagonal_structure, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "demo.png"
    argv = ["demo", "--structures", "diagonal", "--shares", "0.5", "--epochs", "1"]
    assert main([*argv, "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:4] == ["structure", "share", "layer", "params"]
    assert lines[2].startswith("dense") and lines[3].startswith("diagonal")
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert captured.err.splitlines()[-1] == f"wrote {plot}"
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_demo_command_errors(capsys):
    assert main(["demo", "--structures", "nosuch"]) == 2
    assert capsys.readouterr().err.startswith("structurednets: error: unknown structure 'nosuch'")
    if not structurednets.available():
        assert main(["demo"]) == 2
        assert "no structures installed" in capsys.readouterr().err


def test_calibrated_demo_reports_the_output_error(diagonal_structure, capsys):
    plain = run_demo(["diagonal"], shares=[0.5], epochs=1, seed=0)
    calibrated = run_demo(["diagonal"], shares=[0.5], epochs=1, seed=0, calibrate=True)
    assert plain[1].output_relative_error is None
    row = calibrated[1]
    assert 0 < row.output_relative_error < 1
    # the calibrated diagonal differs from the weight fit's (the trained weight's diagonal)
    assert row.relative_error > plain[1].relative_error
    assert "out error" in format_demo_table(calibrated).splitlines()[0]
    argv = ["demo", "--structures", "diagonal", "--shares", "0.5", "--epochs", "1", "--quiet"]
    assert main([*argv, "--calibrate"]) == 0
    assert "out error" in capsys.readouterr().out
