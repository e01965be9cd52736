"""The ``structurednets`` command (also ``python -m structurednets``)."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, NoReturn

import torch

from structurednets import __version__
from structurednets.demo import DEFAULT_SHARES
from structurednets.matrix_files import CommandError, load_matrix
from structurednets.registry import available, get_structure

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit code 2), pointing to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
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
    options = _options(args.option)
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


def _options(pairs: Sequence[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for structure, key, value in pairs:
        options.setdefault(get_structure(structure).name, {})[key] = value
    return options


def _progress(quiet: bool) -> Callable[[str], None] | None:
    return None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))


def _check_plot(path: str | None) -> None:
    """Fail before the long work if ``--plot`` cannot be written."""
    if path is None:
        return
    from structurednets.plotting import check_plot_path

    try:
        check_plot_path(path)
    except ImportError as error:
        raise CommandError(f"--plot: {error}") from None


def _cmd_compare(args: argparse.Namespace) -> None:
    from structurednets.comparison import compare_structures, format_comparison_table

    structures = _check_structures(args.structures)
    options = _options(args.option)
    matrix = load_matrix(args.matrix, args.key)
    inputs = None
    if args.inputs is not None:
        try:
            inputs = load_matrix(args.inputs)
        except CommandError as error:
            raise CommandError(f"--inputs: {error}") from None
    _check_plot(args.plot)
    if not (structures or available()):
        raise CommandError("no structures installed; e.g. pip install structurednets-lowrank")
    torch.set_num_threads(args.threads)
    progress = _progress(args.quiet or args.json)
    output_dim, input_dim = matrix.shape
    if progress:
        progress(
            f"comparing on a {output_dim} x {input_dim} matrix; forward timed against nn.Linear "
            f"with batch {args.batch}, {torch.get_num_threads()} thread(s), float32, "
            f"medians of {args.repeats} rounds"
        )
    rows = compare_structures(
        matrix,
        args.shares,
        structures,
        batch_size=args.batch,
        repeats=args.repeats,
        time_forward=not args.no_timing,
        options=options,
        progress=progress,
        inputs=inputs,
    )
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        print(format_comparison_table(rows))
    if args.plot:
        from structurednets.plotting import plot_comparison

        plot_comparison(rows, args.plot)
        if progress:
            progress(f"wrote {args.plot}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from structurednets.demo import format_demo_table, run_demo

    torch.set_num_threads(args.threads)
    structures = _check_structures(args.structures)
    if not (structures or available()):
        raise CommandError("no structures installed; e.g. pip install structurednets-lowrank")
    _check_plot(args.plot)
    progress = _progress(args.quiet)
    rows = run_demo(
        structures, args.shares, args.epochs, args.seed, progress, calibrate=args.calibrate
    )
    print(format_demo_table(rows))
    if args.plot:
        from structurednets.plotting import plot_demo

        plot_demo(rows, args.plot)
        if progress:
            progress(f"wrote {args.plot}")


def _cmd_scratch(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from structurednets import scratch

    torch.set_num_threads(args.threads)
    structures = _check_structures(args.structures)
    if not (structures or available()):
        raise CommandError("no structures installed; e.g. pip install structurednets-lowrank")
    if args.plot:
        _check_plot(args.plot)
    progress = _progress(args.quiet)
    if not args.no_digits:
        rows = scratch.run_digits(structures, args.digits_shares, args.seed, progress)
        print("digits, test accuracy (64-256-256-10, hidden layer structured):")
        print(scratch.format_digits_table(rows) + "\n")
    if not args.no_lm:
        config = replace(scratch.LMConfig(), steps=args.steps, structure_attention=args.attention)
        results = scratch.run_lm(structures, args.lm_shares, config, args.seed, progress=progress)
        print(f"character language model, {args.steps} steps each:")
        print(scratch.format_lm_table(results))
        if args.plot:
            scratch.plot_lm_curves(results, args.plot)
            if progress:
                progress(f"wrote {args.plot}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="structurednets",
        description="Structured-matrix layers for PyTorch: compare structures on a matrix, "
        "benchmark their speed, and run the demo.",
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
        default=list(DEFAULT_SHARES),
        metavar="SHARE",
        help="nb_params_share values of the hidden layer (default: "
        + " ".join(f"{share:g}" for share in DEFAULT_SHARES)
        + ")",
    )
    demo.add_argument("--epochs", type=int, default=30, help="most epochs per training round")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    demo.add_argument(
        "--plot", metavar="FILE", help="also draw accuracy against share (needs matplotlib)"
    )
    demo.add_argument(
        "--calibrate",
        action="store_true",
        help="fit to the hidden layer's output error on the training digits, not its weight",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress lines")
    demo.set_defaults(run=_cmd_demo)

    scratch = commands.add_parser(
        "scratch",
        help="train a digit classifier and a character language model from scratch with "
        "structured layers, against dense ones",
    )
    scratch.add_argument("--structures", nargs="+", metavar="NAME", help="default: all installed")
    scratch.add_argument(
        "--digits-shares", nargs="+", type=_share, default=[0.02, 0.05, 0.1, 0.25], metavar="S"
    )
    scratch.add_argument(
        "--lm-shares", nargs="+", type=_share, default=[0.1, 0.25, 0.5], metavar="S"
    )
    scratch.add_argument(
        "--steps", type=_positive_int, default=200, help="language-model steps (default: 200)"
    )
    scratch.add_argument(
        "--attention", action="store_true", help="structure the attention projections too"
    )
    scratch.add_argument("--no-digits", action="store_true", help="skip the digit classifier")
    scratch.add_argument("--no-lm", action="store_true", help="skip the language model")
    scratch.add_argument("--seed", type=int, default=0)
    scratch.add_argument(
        "--threads", type=_positive_int, default=1, help="torch threads (default: 1)"
    )
    scratch.add_argument(
        "--plot", metavar="FILE", help="draw the language models' curves (needs matplotlib)"
    )
    scratch.add_argument("--quiet", action="store_true", help="no progress lines")
    scratch.set_defaults(run=_cmd_scratch)

    compare = commands.add_parser(
        "compare",
        help="fit every structure to a matrix: error, parameters, fitting time, forward speed",
        description="Fit each installed structure to the matrix in MATRIX (.npy, .npz, .pt or "
        ".pth; the weight of a layer: output_dim x input_dim) at each share, and print the "
        "relative Frobenius error (and with --inputs the output error), the parameter count, "
        "the fitting time and the forward "
        "speed against nn.Linear of the same shape.",
    )
    compare.add_argument("matrix", metavar="MATRIX", help="a .npy, .npz, .pt or .pth file")
    compare.add_argument(
        "--inputs",
        metavar="X",
        help="inputs of the layer (n_samples x input_dim, a .npy, .npz or .pt file): fit each "
        "structure to the output error on them and add its column",
    )
    compare.add_argument(
        "--key", help="the array to use from a .npz file or a dict (e.g. a state_dict) in a .pt"
    )
    compare.add_argument(
        "--shares",
        nargs="+",
        type=_share,
        default=[0.05, 0.1, 0.25, 0.5],
        metavar="SHARE",
        help="nb_params_share values (default: 0.05 0.1 0.25 0.5)",
    )
    compare.add_argument("--structures", nargs="+", metavar="NAME", help="default: all installed")
    compare.add_argument(
        "--batch", type=_positive_int, default=256, help="rows of the timed input (default: 256)"
    )
    compare.add_argument(
        "--repeats", type=_positive_int, default=15, help="rounds per median (default: 15)"
    )
    compare.add_argument(
        "--threads", type=_positive_int, default=1, help="torch threads (default: 1)"
    )
    compare.add_argument(
        "--no-timing", action="store_true", help="skip the forward timing (faster)"
    )
    compare.add_argument(
        "--option",
        action="append",
        type=_option,
        default=[],
        metavar="S.KEY=VALUE",
        help="structure option, e.g. --option lowrank.rank=8 (repeatable)",
    )
    compare.add_argument(
        "--plot", metavar="FILE", help="draw error against share to FILE.png (needs matplotlib)"
    )
    compare.add_argument("--json", action="store_true", help="print JSON instead of a table")
    compare.add_argument("--quiet", action="store_true", help="no progress lines")
    compare.set_defaults(run=_cmd_compare)
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
