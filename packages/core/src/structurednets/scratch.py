"""Training structured layers from scratch: the ``structurednets scratch`` benchmark.

Two tasks, nothing downloaded:

1. the digit classifier of the demo (64-256-256-10), its hidden layer built by each
   installed structure at a few shares and trained from a random start with the default
   settings of :func:`~structurednets.training_helpers.train_with_decreasing_lr`, against
   the dense layer;
2. a small character-level transformer trained on the standard library's docstrings
   (:mod:`structurednets.scratch_lm`), its feed-forward projections structured at a few
   shares, against the dense model of the same width and a dense model whose feed-forward
   width is narrowed to the same number of weights; all for the same number of steps.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from structurednets.demo import HIDDEN, _split
from structurednets.layers.layer_helpers import get_nb_model_parameters
from structurednets.registry import available, create, get_structure
from structurednets.scratch_lm import LMConfig, LMResult, Vocabulary, stdlib_docstrings
from structurednets.scratch_lm import train_char_lm as _train_char_lm
from structurednets.training_helpers import train_with_decreasing_lr
from structurednets.validation import BudgetTooSmallError

__all__ = [
    "DIGITS_SHARES",
    "LM_SHARES",
    "DigitsRow",
    "format_digits_table",
    "format_lm_table",
    "plot_lm_curves",
    "run_digits",
    "run_lm",
]

DIGITS_SHARES = (0.02, 0.05, 0.1, 0.25)
LM_SHARES = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class DigitsRow:
    """One hidden layer trained from scratch (``structure="dense"``: ``nn.Linear``).

    ``accuracy`` is the test accuracy, ``None`` (with the reason in ``skipped``) where the
    structure does not fit the share; ``collapsed`` whether a training round was rolled back.
    """

    structure: str
    nb_params_share: float
    nb_parameters: int | None
    accuracy: float | None
    seconds: float | None
    collapsed: bool = False
    skipped: str | None = None


def _digits_model(hidden: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            input=nn.Linear(64, HIDDEN),
            act1=nn.ReLU(),
            hidden=hidden,
            act2=nn.ReLU(),
            output=nn.Linear(HIDDEN, 10),
        )
    )


def run_digits(
    structures: Iterable[str] | None = None,
    shares: Iterable[float] = DIGITS_SHARES,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    **training: object,
) -> list[DigitsRow]:
    """Train the digit classifier from scratch with each structure at each share.

    ``training`` overrides settings of ``train_with_decreasing_lr`` (none by default; the
    tests shorten the runs). Returns the dense row first, then structure by structure.
    """
    say = progress or (lambda line: None)
    names = list(structures) if structures is not None else available()
    names = list(dict.fromkeys(get_structure(name).name for name in names))
    data = _split(seed)
    jobs = [("dense", 1.0), *((name, share) for name in names for share in shares)]
    rows = []
    for index, (name, share) in enumerate(jobs, start=1):
        head = f"[digits {index}/{len(jobs)}] {name} at share {share:g}:"
        torch.manual_seed(seed)
        try:
            hidden = nn.Linear(HIDDEN, HIDDEN) if name == "dense" else create(name, HIDDEN, HIDDEN, share)  # fmt: skip
        except BudgetTooSmallError as error:
            say(f"{head} skipped, {error}")
            rows.append(DigitsRow(name, share, None, None, None, skipped=str(error)))
            continue
        model = _digits_model(hidden)
        start = time.perf_counter()
        result = train_with_decreasing_lr(model, data.X_train, data.y_train, seed=seed, **training)
        seconds = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            predictions = model(torch.from_numpy(data.X_test)).argmax(dim=1).numpy()
        accuracy = float(np.mean(predictions == data.y_test))
        say(f"{head} test accuracy {accuracy:.3f} ({seconds:.1f} s)")
        rows.append(
            DigitsRow(
                name, share, get_nb_model_parameters(hidden), accuracy, seconds, result.diverged
            )
        )
    return rows


def format_digits_table(rows: Sequence[DigitsRow]) -> str:
    """Test accuracy per structure (rows) and share (columns), dense first."""
    shares = sorted({row.nb_params_share for row in rows if row.structure != "dense"})
    header = f"{'structure':<10}" + "".join(f" {f'share {s:g}':>11}" for s in shares)
    lines = [header, "-" * len(header)]
    notes = []
    for row in rows:
        if row.structure == "dense":
            lines.append(f"{'dense':<10} {f'{row.accuracy:.3f}':>11} (all shares)")
    for name in dict.fromkeys(row.structure for row in rows if row.structure != "dense"):
        cells = []
        for share in shares:
            row = next((r for r in rows if r.structure == name and r.nb_params_share == share), None)  # fmt: skip
            if row is None or row.accuracy is None:
                cells.append(f" {'-':>11}")
                if row is not None:
                    notes.append(f"{name} at share {share:g}: {row.skipped}")
            else:
                mark = "*" if row.collapsed else ""
                cells.append(f" {f'{row.accuracy:.3f}{mark}':>11}")
        lines.append(f"{name:<10}" + "".join(cells))
    if any(row.collapsed for row in rows):
        notes.append("* a training round collapsed and was rolled back")
    return "\n".join(lines + notes)


def run_lm(
    structures: Iterable[str] | None = None,
    shares: Iterable[float] = LM_SHARES,
    config: LMConfig | None = None,
    seed: int = 0,
    max_chars: int = 800_000,
    progress: Callable[[str], None] | None = None,
) -> list[LMResult]:
    """Train the character-level language model: dense, then per share the narrower dense
    model and each structure in the feed-forward projections, all with ``config``."""
    say = progress or (lambda line: None)
    config = config or LMConfig()
    names = list(structures) if structures is not None else available()
    names = list(dict.fromkeys(get_structure(name).name for name in names))
    start = time.perf_counter()
    train_text, val_text = stdlib_docstrings(max_chars)
    vocabulary = Vocabulary()
    train_codes, val_codes = vocabulary.encode(train_text), vocabulary.encode(val_text)
    say(
        f"language model: {len(train_text)} training and {len(val_text)} validation characters "
        f"of standard-library docstrings ({time.perf_counter() - start:.1f} s)"
    )
    jobs = [("dense", config)]
    for share in shares:
        narrow = max(1, round(share * config.ff_width))
        jobs.append((f"narrow dense (ff {narrow})", replace(config, ff_width=narrow, share=share)))
        jobs.extend((name, replace(config, structure=name, share=share)) for name in names)
    results = []
    for index, (name, job) in enumerate(jobs, start=1):
        label = name if job.structure is None else f"{name} {job.share:g}"
        say(f"[lm {index}/{len(jobs)}] {label}: {job.steps} steps ...")
        try:
            result = _train_char_lm(job, train_codes, val_codes, label, seed, vocabulary.size, say)
        except BudgetTooSmallError as error:
            say(f"[lm {index}/{len(jobs)}] {label}: skipped, {error}")
            continue
        say(
            f"[lm {index}/{len(jobs)}] {label}: validation {result.final_val_bpc:.3f} bits/char, "
            f"{result.nb_parameters} parameters, {1e3 * result.seconds_per_step:.0f} ms/step"
        )
        results.append(result)
    return results


def format_lm_table(results: Sequence[LMResult]) -> str:
    """Validation and training bits per character, parameters and time per step."""
    header = (
        f"{'model':<24} {'ff share':>8} {'params':>8} {'ff params':>9} {'val bpc':>8} "
        f"{'train bpc':>9} {'ms/step':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.name:<24} {r.share:>8g} {r.nb_parameters:>8d} {r.nb_ff_parameters:>9d} "
            f"{r.final_val_bpc:>8.3f} {r.final_train_bpc:>9.3f} {1e3 * r.seconds_per_step:>8.0f}"
        )
    return "\n".join(lines)


def plot_lm_curves(results: Sequence[LMResult], path: str) -> None:
    """Validation bits per character against step, one panel per share; written to ``path``."""
    from structurednets.plotting import require_matplotlib

    shares = sorted({r.share for r in results if r.share < 1.0})
    figure = require_matplotlib()(figsize=(4.2 * max(1, len(shares)), 4.2), layout="constrained")
    axes_list = np.atleast_1d(figure.subplots(1, max(1, len(shares)), sharey=True))
    dense = [r for r in results if r.share == 1.0 and r.structure is None]
    for axes, share in zip(axes_list, shares or [1.0], strict=False):
        for r in dense + [r for r in results if r.share == share]:
            style = "--" if r.structure is None else "-"
            axes.plot(r.steps[1:], r.val_bpc[1:], style, marker=".", label=r.name)
        axes.set_title(f"feed-forward share {share:g}")
        axes.set_xlabel("training step")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    axes_list[0].set_ylabel("validation bits per character")
    figure.savefig(path, dpi=120)
