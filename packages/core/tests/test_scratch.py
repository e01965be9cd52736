"""The from-scratch benchmark's code paths, on small settings (the full run: nox -s scratch)."""

import math

import pytest

from structurednets.cli import main
from structurednets.scratch import (
    format_digits_table,
    format_lm_table,
    plot_lm_curves,
    run_digits,
)
from structurednets.scratch_lm import (
    ALPHABET,
    CharLM,
    LMConfig,
    Vocabulary,
    stdlib_docstrings,
    train_char_lm,
)
from structurednets.testing import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def test_docstrings_are_split_by_file(tmp_path):
    for index in range(4):
        (tmp_path / f"m{index}.py").write_text(
            f'"""Module {index} says hello to the reader of this text."""\n'
            "def f():\n"
            f'    """Function of module {index}, with a docstring long enough."""\n'
        )
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text('"""A test suite docstring that must be skipped."""')
    (tmp_path / "broken.py").write_text("def (:\n")
    train, validation = stdlib_docstrings(root=str(tmp_path), validation_every=2)
    # sorted files: broken, m0, m1, m2, m3 -> broken and m1, m3 validate
    assert "Module 0" in train and "Module 2" in train and "Module 1" not in train
    assert "Module 1" in validation and "Function of module 3" in validation
    assert "test suite" not in train + validation
    with pytest.raises(ValueError, match="too few docstrings"):
        stdlib_docstrings(root=str(tmp_path / "tests"))


def test_the_standard_library_gives_english_text():
    train, validation = stdlib_docstrings(max_chars=20_000)
    assert len(train) > 10_000 and len(validation) > 100
    assert train.count(" the ") > 20


def test_vocabulary():
    codes = Vocabulary().encode("ab\n~é")
    assert codes.tolist() == [ALPHABET.index(c) for c in "ab\n~~"]


def test_char_lm_learns_a_repetitive_text():
    """A tiny model on a periodic text falls far below the uniform 6.6 bits per character;
    the feed-forward projections are the test-only structure where asked."""
    text = "the quick brown fox jumps over the lazy dog. " * 60
    codes = Vocabulary().encode(text)
    config = LMConfig(d_model=16, nb_heads=2, ff_width=32, context=16, batch_size=8,
                      steps=40, warmup_steps=5, eval_every=20, eval_batches=2, lr=2e-2)  # fmt: skip
    result = train_char_lm(config, codes, codes, "dense")
    assert result.steps == [0, 20, 40]
    assert result.val_bpc[0] > 5 and result.val_bpc[-1] < 3
    assert result.nb_parameters == sum(
        p.numel() for p in CharLM(config, len(ALPHABET)).parameters()
    )
    assert result.nb_ff_parameters == 2 * (16 * 32 + 32 + 32 * 16 + 16)
    assert result.seconds_per_step > 0 and math.isfinite(result.final_train_bpc)
    table = format_lm_table([result])
    assert "dense" in table and f"{result.final_val_bpc:.3f}" in table


def test_structured_char_lm(diagonal_structure):
    codes = Vocabulary().encode("abcdefgh" * 40)
    config = LMConfig(d_model=16, nb_heads=2, ff_width=32, context=8, batch_size=4, steps=3,
                      warmup_steps=1, eval_every=3, eval_batches=1, structure="diag", share=0.5)  # fmt: skip
    result = train_char_lm(config, codes, codes, "diag 0.5")
    assert result.nb_ff_parameters == 2 * (16 + 32 + 16 + 16)  # diagonals and biases
    with pytest.raises(ValueError, match="longer than context=8"):
        train_char_lm(config, codes[:5], codes, "short")


def test_plot_lm_curves(tmp_path):
    pytest.importorskip("matplotlib")
    codes = Vocabulary().encode("abcdefgh" * 40)
    config = LMConfig(d_model=8, nb_heads=2, ff_width=8, context=8, batch_size=4, steps=2,
                      warmup_steps=1, eval_every=1, eval_batches=1)  # fmt: skip
    results = [
        train_char_lm(config, codes, codes, "dense"),
        train_char_lm(
            LMConfig(**{**config.__dict__, "ff_width": 2, "share": 0.25}), codes, codes, "narrow"
        ),
    ]
    plot_lm_curves(results, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_run_digits_rows_and_table(diagonal_structure):
    lines = []
    rows = run_digits(["diag"], [0.5, 0.002], seed=0, progress=lines.append,
                      nb_lr_rounds=1, max_epochs_per_round=2)  # fmt: skip
    dense, diagonal, skipped = rows
    assert (dense.structure, diagonal.structure, skipped.structure) == (
        "dense",
        "diagonal",
        "diagonal",
    )
    assert dense.nb_parameters == 256 * 256 + 256 and diagonal.nb_parameters == 256 + 256
    assert 0.5 < dense.accuracy <= 1 and 0 <= diagonal.accuracy <= 1
    assert skipped.accuracy is None and "nb_params_share=0.002" in skipped.skipped
    assert lines[0].startswith("[digits 1/3] dense at share 1: test accuracy")
    table = format_digits_table(rows)
    assert f"{diagonal.accuracy:.3f}" in table and "diagonal at share 0.002:" in table


def test_cli_scratch_refuses_a_bad_plot_before_training(diagonal_structure, capsys):
    assert main(["scratch", "--structures", "diag", "--plot", "curves.nothing"]) == 2
    assert "cannot write a picture" in capsys.readouterr().err
