"""The GPU check: the conformance kit on a CUDA device for every installed structure, and
bfloat16-autocast timings against cuBLAS ``nn.Linear``, printed as one table.

On a machine with a CUDA GPU (and a CUDA build of torch)::

    python packages/core/benchmarks/gpu_check.py          # or: nox -s gpu-check
    python packages/core/benchmarks/gpu_check.py --size 2048 --batches 1024 --skip-kit

For every structure it runs the kit as the structure's own test suite runs it (``pytest
packages/<name>/tests -k conformance``, so the CUDA checks ``cuda`` and ``cuda_precision``
run instead of skipping), the suites in parallel processes (``--jobs``), plus the autocast
and converted-dtype checks on the device itself; then it times forward (no gradient) and forward+backward under
``torch.autocast(device, torch.bfloat16)`` for a ``size x size`` layer of each structure at
``--share``, with batches of 4096 and 16 tokens, against ``nn.Linear`` of the same shape, as
medians over ``--repeats`` rounds (the device synchronised around each round). The table gives
milliseconds and ratios to ``nn.Linear``; slow-path warnings are listed under it. Exit status:
1 if a check failed. The same code runs on the CPU with ``--device cpu`` (core's tests do so
at small sizes).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import structurednets
from structurednets.testing import ConformanceCase, conformance_checks
from structurednets.testing.case import CheckSkipped
from structurednets.testing.precision_checks import check_autocast_on, check_converted_on

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class KitResult:
    """The kit's outcome for one structure."""

    structure: str
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        if self.failures:
            return f"FAIL {len(self.failures)}"
        return f"pass ({len(self.skipped)} skip)"


def run_kit(structure: str, device: str, checks: list[str] | None = None) -> KitResult:
    """Every check of the kit (or those named in ``checks``) on ``structure`` with a default
    :class:`ConformanceCase`, then the autocast and converted-dtype checks on ``device``;
    failures are collected, not raised."""
    start = time.perf_counter()
    result = KitResult(structure)
    case = ConformanceCase(structure)
    selected = [c for c in conformance_checks() if checks is None or c.name in checks]
    device_checks = [
        (f"autocast_on_{device}", lambda: check_autocast_on(case, device)),
        (f"converted_on_{device}", lambda: check_converted_on(case, device)),
    ]
    runs = [(check.name, lambda check=check: check.run(case)) for check in selected]
    for name, run in runs + device_checks:
        try:
            run()
        except CheckSkipped as reason:
            result.skipped.append(f"{name}: {reason}")
        except Exception as error:  # noqa: BLE001 - every failure is reported
            result.failures.append(f"{name}: {type(error).__name__}: {str(error)[:300]}")
    result.seconds = time.perf_counter() - start
    return result


def plugin_tests(structure: str) -> Path | None:
    """The test directory of ``structure``'s package in this repository, if there is one."""
    tests = ROOT / "packages" / structure / "tests"
    return tests if tests.is_dir() else None


def run_kit_tests(structure: str, tests: Path, selection: str = "conformance") -> KitResult:
    """The kit as ``structure``'s own test suite runs it (its ``ConformanceCase``, with the
    structure's options and skips): ``pytest tests -k selection`` in a fresh process."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", str(tests), "-q", "-rfs", "-k", selection]
    command += ["-p", "no:cacheprovider"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    lines = done.stdout.splitlines()
    result = KitResult(structure, seconds=time.perf_counter() - start)
    result.failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    for line in lines:  # "SKIPPED [2] file:line: reason" stands for two skipped tests
        if line.startswith("SKIPPED"):
            count = re.match(r"SKIPPED \[(\d+)\]", line)
            result.skipped += [line] * (int(count.group(1)) if count else 1)
    if done.returncode not in (0, 5) and not result.failures:  # 5: nothing selected
        result.failures.append(f"pytest exited {done.returncode}: {done.stdout[-300:]}")
    return result


def run_kits(
    structures: list[str], device: str, checks: list[str] | None, jobs: int
) -> list[KitResult]:
    """For each structure: its package's conformance tests (:func:`run_kit_tests`, in
    parallel processes) and :func:`run_kit` (the device checks, and the whole kit with a
    default case for a structure without tests here), in this process."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        suites = {
            name: pool.submit(run_kit_tests, name, tests)
            for name in structures
            if checks is None and (tests := plugin_tests(name)) is not None
        }
        results = []
        for name in structures:
            here = run_kit(name, device, [] if name in suites else checks)
            if name in suites:
                suite = suites[name].result()
                here.failures += suite.failures
                here.skipped += suite.skipped
                here.seconds += suite.seconds
            results.append(here)
    return results


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def median_ms(step, device: str, repeats: int, round_seconds: float = 0.05) -> float:
    """Median milliseconds per call of ``step`` over ``repeats`` rounds, each of enough calls
    to take about ``round_seconds``, with the device synchronised around every round."""
    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    calls = max(1, int(round_seconds / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        _sync(device)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e3


def _steps(layer: nn.Module, U: torch.Tensor, dtype: torch.dtype):
    device = U.device.type
    U_train = U.clone().requires_grad_(True)

    def forward():
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            layer(U)

    def train():
        layer.zero_grad(set_to_none=True)
        U_train.grad = None
        with torch.autocast(device, dtype=dtype):
            Y = layer(U_train)
        Y.backward(torch.ones_like(Y))

    return forward, train


def time_structures(
    structures: list[str],
    device: str,
    size: int,
    batches: list[int],
    share: float,
    repeats: int,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """``{name: {"fwd 4096": ms, "f+b 4096": ms, ...}}`` with ``"nn.Linear"`` first, and the
    warnings (slow paths) the runs raised. A structure that fails to build or run gets its
    error under ``"error"``."""
    timings: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = {"nn.Linear": lambda: nn.Linear(size, size)}
        for name in structures:
            layers[name] = lambda name=name: structurednets.create(name, size, size, share)
        for name, build in layers.items():
            try:
                torch.manual_seed(0)
                layer = build().to(device)
                row = {}
                for batch in batches:
                    U = torch.randn(batch, size, device=device)
                    forward, train = _steps(layer, U, dtype)
                    row[f"fwd {batch}"] = median_ms(forward, device, repeats)
                    row[f"f+b {batch}"] = median_ms(train, device, repeats)
                timings[name] = row
            except Exception as error:  # noqa: BLE001 - reported in the table
                timings[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            finally:
                layer = None
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    notes = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    return timings, notes


def format_report(
    kits: list[KitResult], timings: dict[str, dict], batches: list[int], title: str
) -> str:
    """One table: a row per structure (kit outcome, then ms and ratio to nn.Linear)."""
    columns = [f"{kind} {batch}" for batch in batches for kind in ("fwd", "f+b")]
    kit_of = {kit.structure: kit.summary() for kit in kits}
    header = f"{'structure':<10} {'kit':>14} " + " ".join(f"{c + ' ms (x)':>18}" for c in columns)
    lines = [title, header, "-" * len(header)]
    dense = timings.get("nn.Linear", {})
    for name in dict.fromkeys([*timings, *kit_of]):
        row = timings.get(name, {})
        cells = []
        for column in columns:
            if column not in row:
                cells.append(f"{'-':>18}")
                continue
            ratio = row[column] / dense[column] if dense.get(column) else float("nan")
            cells.append(f"{f'{row[column]:.3f} ({ratio:.2f}x)':>18}")
        line = f"{name:<10} {kit_of.get(name, '-'):>14} " + " ".join(cells)
        if "error" in row:
            line += f"  {row['error']}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16])
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--structures", nargs="+", default=None)
    parser.add_argument("--checks", nargs="+", default=None, help="kit checks (default: all)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel kit processes")
    parser.add_argument("--skip-kit", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (or a CPU build of torch); use --device cpu to try it")
        return 2
    start = time.perf_counter()
    structures = args.structures or structurednets.available()
    jobs = args.jobs if args.jobs is not None else len(structures)
    kits = [] if args.skip_kit else run_kits(structures, args.device, args.checks, jobs)
    timings, notes = time_structures(
        structures, args.device, args.size, args.batches, args.share, args.repeats
    )
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    title = (
        f"{where}, torch {torch.__version__}: {args.size} x {args.size}, share {args.share:g}, "
        "bfloat16 autocast, medians in ms (ratio to nn.Linear)"
    )
    print(format_report(kits, timings, args.batches, title))
    for kit in kits:
        for failure in kit.failures:
            print(f"FAILED {kit.structure} {failure}")
    for note in notes:
        print(note)
    print(f"gpu_check took {time.perf_counter() - start:.0f} s")
    return 1 if any(kit.failures for kit in kits) else 0


if __name__ == "__main__":
    sys.exit(main())
