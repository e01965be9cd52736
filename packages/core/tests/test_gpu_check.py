"""The GPU check (benchmarks/gpu_check.py) run on the CPU at small sizes: the same code path."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from diagonal_structure import UpcastsUnderAutocast, diagonal_nb_weight_parameters

import structurednets

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SMALL = ["--device", "cpu", "--size", "32", "--batches", "8", "2", "--repeats", "2"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_table_and_kit_on_cpu(gpu_check, diagonal_structure, capsys):
    checks = ["output_shapes", "dtypes_and_autocast", "cuda_precision"]
    code = gpu_check.main([*SMALL, "--structures", "diagonal", "--checks", *checks])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "fwd 8 ms (x)" in out and "f+b 2 ms (x)" in out
    assert rows["nn.Linear"].count("(1.00x)") == 4
    assert "pass (1 skip)" in rows["diagonal"]  # cuda_precision: no CUDA here
    assert rows["diagonal"].count("x)") == 4
    kit = gpu_check.run_kit("diagonal", "cpu", [])
    assert kit.failures == [] and kit.skipped == []  # autocast_on_cpu, converted_on_cpu ran


def test_a_failing_structure_fails_the_check(gpu_check, capsys):
    structurednets.register("upcasts", UpcastsUnderAutocast, diagonal_nb_weight_parameters)
    try:
        code = gpu_check.main([*SMALL, "--structures", "upcasts", "--checks", "output_shapes"])
    finally:
        structurednets.unregister("upcasts")
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL 2" in out and "FAILED upcasts autocast_on_cpu" in out


def test_kit_through_a_test_suite(gpu_check):
    tests = Path(__file__).resolve().parent
    selection = "diagonal_structure_passes_every_check and (output_shapes or cuda)"
    result = gpu_check.run_kit_tests("diagonal", tests / "test_conformance_kit.py", selection)
    assert result.failures == [], result.failures
    assert len(result.skipped) == 2  # cuda and cuda_precision, without a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_cuda_it_says_so(gpu_check, capsys):
    assert gpu_check.main(["--skip-kit"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
