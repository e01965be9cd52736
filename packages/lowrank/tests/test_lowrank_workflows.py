"""The user workflows (approximate, compress, compare, demo) on a real installed plugin.

The command-line runs start a fresh interpreter, as a user would, so the structure comes
from the installed entry point; they are started together to save time.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import structurednets
from structurednets.approximation import format_error


def start(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "structurednets", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(run):
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert "Traceback" not in err
    return out, err


def low_rank_plus_noise(shape=(48, 40), rank=3, noise=1e-2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1])) + (
        noise * rng.standard_normal(shape)
    )


def test_compare_command_prints_what_the_library_computes(tmp_path):
    W = low_rank_plus_noise()
    np.save(tmp_path / "W.npy", W)
    torch.save({"fc.weight": torch.from_numpy(W), "fc.bias": torch.zeros(48)}, tmp_path / "m.pt")
    shares = ["0.01", "0.1", "0.5"]
    common = ["--shares", *shares, "--batch", "16", "--repeats", "3"]
    json_run = start("compare", str(tmp_path / "W.npy"), *common, "--json")
    table_run = start(
        "compare", str(tmp_path / "m.pt"), "--key", "fc.weight", "--structures", "lr",
        *common, "--plot", str(tmp_path / "errors.png"),
    )  # fmt: skip
    out, err = finish(json_run)
    rows = json.loads(out)
    assert err == ""
    lowrank = [row for row in rows if row["structure"] == "lowrank"]
    assert [row["nb_params_share"] for row in lowrank] == [0.01, 0.1, 0.5]
    skipped, tenth, half = lowrank
    # 0.01 * 48 * 40 = 19 < 88 weights of rank 1
    assert (
        skipped["relative_error"] is None and "use nb_params_share >= 0.0459" in skipped["skipped"]
    )
    for row, share in ((tenth, 0.1), (half, 0.5)):
        expected = structurednets.approximate(W, "lowrank", share)
        assert row["relative_error"] == pytest.approx(expected.relative_error, rel=1e-12)
        assert row["nb_parameters"] == expected.nb_parameters
        assert row["nb_parameters"] == structurednets.nb_parameters("lowrank", 40, 48, share, False)
        assert row["dense_nb_parameters"] == 48 * 40 and row["batch_size"] == 16
        assert row["forward_ratio"] > 0 and row["fit_seconds"] >= 0
    assert half["relative_error"] < 1e-2  # rank 10: only the noise is lost
    assert 0.1 < tenth["relative_error"] < 1  # rank 2 of a rank-3 matrix

    out, err = finish(table_run)
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["structure", "share", "params", "rel.", "error"]
    table = {line.split()[1]: line.split() for line in lines[2:5]}
    assert table["0.01"][2:] == ["-"] * 7
    for row in (tenth, half):
        cells = table[f"{row['nb_params_share']:g}"]
        assert cells[:4] == [
            "lowrank",
            f"{row['nb_params_share']:g}",
            str(row["nb_parameters"]),
            format_error(row["relative_error"]).strip(),
        ]
    assert lines[5].startswith("lowrank at share 0.01: nb_params_share=0.01 allows 19 weight")
    assert err.splitlines()[0].startswith("comparing on a 48 x 40 matrix")
    assert err.splitlines()[-1] == f"wrote {tmp_path / 'errors.png'}"
    assert (tmp_path / "errors.png").read_bytes().startswith(b"\x89PNG")


def test_demo_command():
    run = start("demo", "--structures", "lowrank", "--shares", "0.05", "--epochs", "2")
    out, err = finish(run)
    header, _, dense, lowrank = out.splitlines()
    assert header.split()[:4] == ["structure", "share", "layer", "params"]
    assert dense.split()[:4] == ["dense", "1", "65792", "85002"]
    layer_params = structurednets.nb_parameters("lowrank", 256, 256, 0.05)
    cells = lowrank.split()
    assert cells[:4] == ["lowrank", "0.05", str(layer_params), str(85002 - 65792 + layer_params)]
    assert all(0 <= float(accuracy) <= 1 for accuracy in cells[5:7])
    assert "[1/1] lowrank at share 0.05: fine-tuned in" in err


def test_approximate_best_with_lowrank():
    W = low_rank_plus_noise(noise=0.0)
    result = structurednets.approximate(W, "best", 0.25)
    assert [each.structure for each in result.tried] == structurednets.available()
    lowrank = next(each for each in result.tried if each.structure == "lowrank")
    assert lowrank.relative_error < 1e-6  # rank 5 >= 3
    assert result.relative_error <= lowrank.relative_error


def test_compress_a_model_whose_weights_are_low_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 20))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            out_features, in_features = layer.weight.shape
            layer.weight.copy_(torch.randn(out_features, 2) @ torch.randn(2, in_features) / 10)
    compressed, report = structurednets.compress(model, "lowrank", 0.2)
    assert [layer.structure for layer in report.layers] == ["lowrank", "lowrank"]
    assert all(layer.relative_error < 1e-6 for layer in report.layers)
    assert report.layers[0].nb_parameters_after == 3 * 70 + 40  # rank floor(240 / 70) = 3
    U = torch.randn(8, 30)
    torch.testing.assert_close(compressed(U), model(U), rtol=1e-5, atol=1e-5)
    assert compressed[0].left.dtype == torch.float32
