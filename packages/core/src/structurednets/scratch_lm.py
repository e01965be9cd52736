"""A small character-level transformer language model, trained from scratch on the docstrings
of the Python standard library, with its projections dense or structured.

The text is read at run time from the standard library of the running interpreter (every
module, class and function docstring, found with :mod:`ast`); nothing is downloaded. Files
are split between training and validation text, so the validation text is unseen prose.
"""

from __future__ import annotations

import ast
import math
import os
import statistics
import sysconfig
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from structurednets.layers.layer_helpers import get_nb_model_parameters
from structurednets.registry import create
from structurednets.training_helpers import param_groups

__all__ = [
    "CharLM",
    "LMConfig",
    "LMResult",
    "Vocabulary",
    "stdlib_docstrings",
    "train_char_lm",
]

#: Characters the model knows; anything else is read as ``"~"``.
ALPHABET = "\n" + "".join(chr(code) for code in range(32, 127))


@dataclass(frozen=True)
class Vocabulary:
    """Printable ASCII and the newline; other characters map to ``"~"``."""

    alphabet: str = ALPHABET

    @property
    def size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        """``(len(text),)`` int64 codes."""
        index = {char: code for code, char in enumerate(self.alphabet)}
        unknown = index["~"]
        return torch.tensor([index.get(char, unknown) for char in text], dtype=torch.int64)


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=True)
            if text and len(text) >= 40:
                found.append(text)
    return found


def stdlib_docstrings(
    max_chars: int = 1_500_000, validation_every: int = 10, root: str | None = None
) -> tuple[str, str]:
    """Training and validation text from the standard library's docstrings.

    Files under ``root`` (default: this interpreter's stdlib, without ``site-packages`` and
    test suites) are read in sorted order until ``max_chars`` characters are collected;
    every ``validation_every``-th file goes to the validation text.

    Returns:
        ``(train_text, validation_text)``; docstrings are separated by blank lines.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in skipped)
        paths.extend(os.path.join(folder, name) for name in sorted(files) if name.endswith(".py"))
    train, validation, total = [], [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        for index, path in enumerate(paths):
            try:
                with open(path, encoding="utf-8") as handle:
                    texts = _docstrings(handle.read())
            except (OSError, UnicodeDecodeError):
                continue
            (validation if index % validation_every == 0 else train).extend(texts)
            total += sum(len(text) + 2 for text in texts)
            if total >= max_chars:
                break
    if not train or not validation:
        raise ValueError(f"found too few docstrings under {root!r} for a training text")
    return "\n\n".join(train), "\n\n".join(validation)


@dataclass(frozen=True)
class LMConfig:
    """Sizes and training settings of the language model (every model of a run shares them).

    ``structure=None`` is the dense model; ``ff_width`` the feed-forward hidden width (the
    narrower dense baseline lowers it). ``share`` applies to the feed-forward projections,
    and to the attention projections too when ``structure_attention``.
    """

    d_model: int = 64
    nb_layers: int = 2
    nb_heads: int = 4
    ff_width: int = 256
    context: int = 64
    batch_size: int = 16
    steps: int = 200
    lr: float = 3e-3
    warmup_steps: int = 30
    eval_every: int = 50
    eval_batches: int = 8
    structure: str | None = None
    share: float = 1.0
    structure_attention: bool = False
    options: dict = field(default_factory=dict)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a ReLU feed-forward."""

    def __init__(self, config: LMConfig, linear: Callable[[int, int, str], nn.Module]):
        super().__init__()
        d = config.d_model
        self.nb_heads = config.nb_heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_out = linear(d, 3 * d, "attention"), linear(d, d, "attention")
        self.ff_in = linear(d, config.ff_width, "ff")
        self.ff_out = linear(config.ff_width, d, "ff")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (t.reshape(batch, length, self.nb_heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, length, d))
        return x + self.ff_out(torch.relu(self.ff_in(self.norm2(x))))


class CharLM(nn.Module):
    """``(batch, length)`` codes -> ``(batch, length, vocab)`` next-character logits."""

    def __init__(self, config: LMConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(vocab_size, config.d_model)
        self.position = nn.Parameter(torch.randn(config.context, config.d_model) * 0.1)
        self.blocks = nn.ModuleList(_Block(config, self._linear) for _ in range(config.nb_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, vocab_size)

    def _linear(self, input_dim: int, output_dim: int, part: str) -> nn.Module:
        config = self.config
        if config.structure is None or (part == "attention" and not config.structure_attention):
            return nn.Linear(input_dim, output_dim)
        return create(config.structure, input_dim, output_dim, config.share, **config.options)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes) + self.position[: codes.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def nb_ff_parameters(self) -> int:
        """Parameters of the feed-forward projections (biases included)."""
        return sum(get_nb_model_parameters(b.ff_in) + get_nb_model_parameters(b.ff_out) for b in self.blocks)  # fmt: skip


@dataclass
class LMResult:
    """One trained model: its curve of validation bits per character, its size and speed."""

    name: str
    structure: str | None
    share: float
    nb_parameters: int
    nb_ff_parameters: int
    steps: list[int]
    val_bpc: list[float]
    seconds_per_step: float
    final_train_bpc: float

    @property
    def final_val_bpc(self) -> float:
        return self.val_bpc[-1]


def _windows(codes: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, ...]:
    index = starts[:, None] + torch.arange(context + 1)
    chunk = codes[index]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def _bits_per_char(model: CharLM, codes: torch.Tensor, starts: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for begin in range(0, len(starts), batch):
        inputs, targets = _windows(codes, starts[begin : begin + batch], model.config.context)
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        total, count = total + float(loss), count + targets.numel()
    model.train()
    return total / count / math.log(2)


def train_char_lm(
    config: LMConfig,
    train_codes: torch.Tensor,
    val_codes: torch.Tensor,
    name: str,
    seed: int = 0,
    vocab_size: int = len(ALPHABET),
    progress: Callable[[str], None] | None = None,
) -> LMResult:
    """Build a :class:`CharLM` under ``seed`` and train it for ``config.steps`` AdamW steps.

    Every model trained with the same ``seed`` sees the same batches. The rate warms up
    linearly for ``warmup_steps`` and then decays along a cosine to a tenth; per-parameter
    multipliers come from :func:`structurednets.param_groups`; gradients are clipped at 1.

    Args:
        train_codes, val_codes: ``(n,)`` int64 character codes (see :class:`Vocabulary`).

    Returns:
        An :class:`LMResult` with validation bits per character every ``eval_every`` steps.
    """
    context = config.context
    if min(len(train_codes), len(val_codes)) <= context + 1:
        raise ValueError(f"train and validation text must be longer than context={context}")
    torch.manual_seed(seed)
    model = CharLM(config, vocab_size)
    groups = param_groups(model, config.lr)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.01)
    base_rates = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(seed)
    eval_starts = torch.randint(
        0,
        len(val_codes) - context - 1,
        (config.eval_batches * config.batch_size,),
        generator=torch.Generator().manual_seed(seed + 1),
    )
    train_eval_starts = torch.randint(
        0, len(train_codes) - context - 1, (len(eval_starts),), generator=generator
    )
    steps, curve, times = (
        [0],
        [_bits_per_char(model, val_codes, eval_starts, config.batch_size)],
        [],
    )
    for step in range(1, config.steps + 1):
        if step <= config.warmup_steps:
            factor = step / config.warmup_steps
        else:
            done = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
            factor = 0.1 + 0.45 * (1.0 + math.cos(math.pi * done))
        for group, rate in zip(optimizer.param_groups, base_rates, strict=True):
            group["lr"] = rate * factor
        starts = torch.randint(
            0, len(train_codes) - context - 1, (config.batch_size,), generator=generator
        )
        inputs, targets = _windows(train_codes, starts, context)
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"{name}: the training loss became {loss.item()} at step {step}"
            )
        if step % config.eval_every == 0 or step == config.steps:
            steps.append(step)
            curve.append(_bits_per_char(model, val_codes, eval_starts, config.batch_size))
            if progress:
                progress(
                    f"  {name} step {step}/{config.steps}: validation {curve[-1]:.3f} bits/char "
                    f"({1e3 * statistics.median(times):.0f} ms/step)"
                )
    return LMResult(
        name=name,
        structure=config.structure,
        share=config.share,
        nb_parameters=get_nb_model_parameters(model),
        nb_ff_parameters=model.nb_ff_parameters(),
        steps=steps,
        val_bpc=curve,
        seconds_per_step=statistics.median(times),
        final_train_bpc=_bits_per_char(model, train_codes, train_eval_starts, config.batch_size),
    )
