"""The ``structurednets`` command (also ``python -m structurednets``)."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from structurednets import __version__
from structurednets.registry import available, get_structure

__all__ = ["main"]


class CommandError(Exception):
    """An error to report as one line on stderr, with exit code 2."""


def _size(text: str) -> tuple[int, int]:
    """``2048`` or ``1024x512`` (input x output) -> ``(input_dim, output_dim)``."""
    parts = text.lower().split("x")
    try:
        dims = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like 2048 or 1024x512, got {text!r}"
        ) from None
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"size must look like 2048 or 1024x512, got {text!r}")
    return (dims[0], dims[-1])


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"share must be a number in (0, 1], got {text!r}"
        ) from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"share must be a number in (0, 1], got {text!r}")
    return value


def _option(text: str) -> tuple[str, str, Any]:
    """``sss.nb_states=32`` -> ``("sss", "nb_states", 32)``."""
    target, _, value = text.partition("=")
    structure, _, key = target.partition(".")
    if not (structure and key and value):
        raise argparse.ArgumentTypeError(f"option must look like sss.nb_states=32, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return structure, key, parsed


def _check_structures(names: Sequence[str] | None) -> list[str] | None:
    if names is None:
        return None
    return [get_structure(name).name for name in names]


def _cmd_list(args: argparse.Namespace) -> None:
    names = available()
    if not names:
        print("no structures installed; e.g. pip install structurednets-lowrank")
    for name in names:
        structure = get_structure(name)
        print(f"{structure!s:<22} {structure.summary}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from structurednets.benchmark import format_table, run_benchmark

    torch.set_num_threads(args.threads)
    options: dict[str, dict[str, Any]] = {}
    for structure, key, value in args.option:
        options.setdefault(get_structure(structure).name, {})[key] = value
    structures = _check_structures(args.structures)
    if not (structures or available()):
        raise CommandError("no structures installed; e.g. pip install structurednets-lowrank")
    progress = None if args.quiet or args.json else (lambda line: print(line, file=sys.stderr))
    if progress:
        progress(
            f"timing with {torch.get_num_threads()} thread(s), float32, medians of {args.repeats} rounds"
        )
    results = run_benchmark(
        structures, args.sizes, args.shares, args.batch, args.repeats, options, progress
    )
    if args.json:
        print(json.dumps([asdict(result) for result in results], indent=2))
    else:
        print(format_table(results))


def _cmd_demo(args: argparse.Namespace) -> None:
    from structurednets.demo import format_demo_table, run_demo

    torch.set_num_threads(args.threads)
    structures = _check_structures(args.structures)
    if not (structures or available()):
        raise CommandError("no structures installed; e.g. pip install structurednets-lowrank")
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    rows = run_demo(structures, args.shares, args.epochs, args.seed, progress)
    print(format_demo_table(rows))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structurednets",
        description="Structured-matrix layers for PyTorch: benchmarks and demos.",
    )
    parser.add_argument("--version", action="version", version=f"structurednets {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="list the installed structures")
    listing.set_defaults(run=_cmd_list)

    bench = commands.add_parser(
        "bench", help="time forward and forward+backward against nn.Linear of the same shape"
    )
    bench.add_argument("--structures", nargs="+", metavar="NAME", help="default: all installed")
    bench.add_argument(
        "--sizes",
        nargs="+",
        type=_size,
        default=[(2048, 2048)],
        metavar="INxOUT",
        help="layer sizes, e.g. 2048 or 1024x512 (default: 2048)",
    )
    bench.add_argument(
        "--shares",
        nargs="+",
        type=_share,
        default=[0.1],
        metavar="SHARE",
        help="nb_params_share values (default: 0.1)",
    )
    bench.add_argument(
        "--batch",
        nargs="+",
        type=int,
        default=[256],
        metavar="N",
        help="batch sizes (default: 256)",
    )
    bench.add_argument("--repeats", type=int, default=15, help="rounds per median (default: 15)")
    bench.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    bench.add_argument(
        "--option",
        action="append",
        type=_option,
        default=[],
        metavar="S.KEY=VALUE",
        help="structure option, e.g. --option sss.nb_states=32 (repeatable)",
    )
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    bench.set_defaults(run=_cmd_bench)

    demo = commands.add_parser(
        "demo", help="compress a digit classifier's hidden layer with every installed structure"
    )
    demo.add_argument("--structures", nargs="+", metavar="NAME", help="default: all installed")
    demo.add_argument(
        "--shares",
        nargs="+",
        type=_share,
        default=[0.1, 0.25],
        metavar="SHARE",
        help="nb_params_share values (default: 0.1 0.25)",
    )
    demo.add_argument("--epochs", type=int, default=30, help="most epochs per training round")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    demo.add_argument("--quiet", action="store_true", help="no progress lines")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 on success, 2 on a usage or input error)."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, ValueError, TypeError, OSError) as error:
        print(f"structurednets: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("structurednets: interrupted", file=sys.stderr)
        return 130
    return 0
