import json
import subprocess
import sys

import pytest

from structurednets.benchmark import format_table, run_benchmark, time_against_dense
from structurednets.cli import main


def test_time_against_dense_ratio_of_known_work():
    import time

    fast = lambda: time.sleep(0.001)  # noqa: E731
    slow = lambda: time.sleep(0.004)  # noqa: E731
    _, _, ratio = time_against_dense(slow, fast, repeats=3, target_seconds=0.01)
    assert 2.0 < ratio < 6.0


def test_run_benchmark_times_every_structure(diagonal_structure):
    results = run_benchmark(
        ["diagonal"], sizes=[(64, 32)], shares=[0.5], batch_sizes=[8], repeats=2
    )
    (result,) = results
    assert (result.structure, result.input_dim, result.output_dim) == ("diagonal", 64, 32)
    assert result.nb_parameters == 32 + 32 and result.dense_nb_parameters == 64 * 32 + 32
    assert result.forward_ratio > 0 and result.train_ratio > 0
    assert "diagonal" in format_table(results)


def test_bench_command_json(diagonal_structure, capsys):
    code = main(
        [
            "bench",
            "--structures",
            "diag",
            "--sizes",
            "64x32",
            "--batch",
            "4",
            "--repeats",
            "2",
            "--json",
        ]
    )
    assert code == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["structure"] == "diagonal" and row["output_dim"] == 32


def test_bench_command_unknown_structure_is_one_line(capsys):
    assert main(["bench", "--structures", "nosuch", "--repeats", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("structurednets: error: unknown structure 'nosuch'")
    assert error.count("\n") == 1


def test_list_command(diagonal_structure, capsys):
    assert main(["list"]) == 0
    assert "diagonal (alias: diag)" in capsys.readouterr().out


@pytest.mark.slow  # a new Python process
def test_module_entry_point_and_usage_errors():
    run = subprocess.run(
        [sys.executable, "-m", "structurednets", "--version"], capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.startswith("structurednets ")
    run = subprocess.run(
        [sys.executable, "-m", "structurednets", "bench", "--shares", "1.5"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "share must be a number in (0, 1], got '1.5'" in run.stderr
    assert "Traceback" not in run.stderr
