"""Small real data sets shipped with the package, so examples and the demo need no download."""

from __future__ import annotations

import ast
import functools
import gzip
import importlib.resources
import re
import sysconfig
import warnings
import zlib
from pathlib import Path

import numpy as np

__all__ = ["load_digits", "split_sentences", "stdlib_docstrings", "stdlib_sentences"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI optical handwritten digits: 1,797 images of 8 x 8 pixels, classes 0-9.

    Returns:
        ``X`` of shape ``(1797, 64)``, float32 pixel intensities scaled to [0, 1], and
        ``y`` of shape ``(1797,)``, int64 class labels.

    Source: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI
    Machine Learning Repository (1998), CC BY 4.0; the test part of the set, as distributed
    with scikit-learn.
    """
    resource = importlib.resources.files("structurednets") / "data" / "digits.csv.gz"
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    return table[:, :-1] / 16.0, table[:, -1].astype(np.int64)


@functools.cache
def stdlib_docstrings() -> tuple[str, ...]:
    """The docstrings of the Python standard library's modules, classes and functions.

    Real English that every Python installation has, read at run time (nothing is shipped or
    downloaded); files in a deterministic order, tests and ``site-packages`` left out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & {"site-packages", "dist-packages", "test", "tests", "idle_test"}:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes in old modules
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    texts.append(docstring)
    return tuple(texts)


_SENTENCE_END = re.compile(r"(?<=[a-z)][.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]*[a-z)][.!?]$")


def split_sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The prose sentences of a docstring: paragraphs without code (``>>>``, indented or
    symbol-heavy lines) joined and split at sentence ends; each ``min_words`` to
    ``max_words`` words long and plain English characters only."""
    sentences = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue
        for sentence in _SENTENCE_END.split(" ".join(line.strip() for line in lines)):
            sentence = sentence.strip()
            if min_words <= len(sentence.split()) <= max_words and _PROSE.match(sentence):
                sentences.append(sentence)
    return sentences


def stdlib_sentences(part: str | None = None, min_words: int = 6, max_words: int = 40) -> list[str]:
    """English sentences from the standard library's docstrings, without duplicates.

    Args:
        part: ``"calibration"`` (20% of the sentences), ``"training"`` (60%) or
            ``"evaluation"`` (20%), or ``None`` for all. The parts are disjoint and stable:
            a sentence's part follows from a checksum of its text, so the same sentence is in
            the same part on every machine and Python version that has it.
        min_words, max_words: the sentence lengths kept.
    """
    parts = {"calibration": range(0, 20), "training": range(20, 80), "evaluation": range(80, 100)}
    if part is not None and part not in parts:
        raise ValueError(f"part must be one of {sorted(parts)} or None, got {part!r}")
    seen: dict[str, None] = {}
    for docstring in stdlib_docstrings():
        for sentence in split_sentences(docstring, min_words, max_words):
            seen.setdefault(sentence)
    sentences = list(seen)
    if part is None:
        return sentences
    return [s for s in sentences if zlib.crc32(s.encode()) % 100 in parts[part]]
