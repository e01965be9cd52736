import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import structurednets
from structurednets import CheckpointError

TESTS = Path(__file__).parent


def mlp(width=32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(24, width), nn.ReLU(), nn.Linear(width, width), nn.Linear(width, 5)
    )


def compressed(diagonal_structure, width=32):
    small, _ = structurednets.compress(mlp(width), "diagonal", 0.5, include=["0", "2"])
    return small


def state(model):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}


def test_round_trip_restores_structured_layers_bit_for_bit(diagonal_structure, tmp_path):
    small = compressed(diagonal_structure)
    path = structurednets.save(small, tmp_path / "small.safetensors")
    restored = structurednets.load(path, mlp(seed=7))
    assert isinstance(restored[0], structurednets.StructuredLayer)
    assert isinstance(restored[2], structurednets.StructuredLayer)
    assert isinstance(restored[3], nn.Linear)
    assert restored[0].layout == small[0].layout
    U = torch.randn(9, 24)
    assert torch.equal(restored(U), small(U))


@pytest.mark.slow  # a new Python process
def test_round_trip_in_a_new_process(diagonal_structure, tmp_path):
    small = compressed(diagonal_structure)
    structurednets.save(small, tmp_path / "small.safetensors")
    U = torch.randn(4, 24)
    torch.save({"U": U, "Y": small(U).detach()}, tmp_path / "io.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(TESTS)!r})
from diagonal_structure import DiagonalLayer, diagonal_nb_weight_parameters
from torch import nn
import structurednets
structurednets.register("diagonal", DiagonalLayer, diagonal_nb_weight_parameters)
model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 5))
model = structurednets.load({str(tmp_path / "small.safetensors")!r}, model)
io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
assert torch.equal(model(io["U"]), io["Y"]), "outputs differ"
print("same outputs")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "same outputs" in result.stdout


def test_file_size_follows_the_structured_parameters(diagonal_structure, tmp_path):
    model = nn.Sequential(nn.Linear(256, 256))
    small, _ = structurednets.compress(model, "diagonal", 0.1)
    dense_path = structurednets.save(model, tmp_path / "dense.safetensors")
    small_path = structurednets.save(small, tmp_path / "small.safetensors")
    structured_bytes = 4 * small[0].get_nb_parameters()
    assert small_path.stat().st_size < structured_bytes + 4096  # tensors plus a small header
    assert small_path.stat().st_size < dense_path.stat().st_size / 50


def test_integer_buffers_are_stored_narrow_and_restored(tmp_path):
    model = nn.Linear(3, 2)
    model.register_buffer("small_index", torch.arange(100, dtype=torch.int64))
    model.register_buffer("wide_index", torch.tensor([-1, 40000], dtype=torch.int64))
    path = structurednets.save(model, tmp_path / "m.safetensors")
    with safetensors.torch.safe_open(str(path), framework="pt") as handle:
        assert handle.get_slice("small_index").get_dtype() == "I8"
        assert handle.get_slice("wide_index").get_dtype() == "I32"
    skeleton = nn.Linear(3, 2)
    skeleton.register_buffer("small_index", torch.zeros(100, dtype=torch.int64))
    skeleton.register_buffer("wide_index", torch.zeros(2, dtype=torch.int64))
    structurednets.load(path, skeleton)
    assert skeleton.small_index.dtype == torch.int64
    assert torch.equal(skeleton.small_index, model.small_index)
    assert torch.equal(skeleton.wide_index, model.wide_index)


def test_tied_weights_are_stored_once(tmp_path):
    def tied():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
        model[1].weight = model[0].weight
        return model

    model = tied()
    with torch.no_grad():
        model[0].weight.mul_(3)
    path = structurednets.save(model, tmp_path / "tied.safetensors")
    with safetensors.torch.safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["0.weight"]
    restored = structurednets.load(path, tied())
    assert restored[1].weight is restored[0].weight
    assert torch.equal(restored[1].weight, model[0].weight)


def test_a_failing_save_leaves_the_previous_file_intact(diagonal_structure, tmp_path, monkeypatch):
    small = compressed(diagonal_structure)
    path = structurednets.save(small, tmp_path / "small.safetensors")
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        structurednets.save(compressed(diagonal_structure, width=16), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.safetensors"]  # no temporary left


@pytest.mark.parametrize("damage", ["truncated", "corrupted header", "empty"])
def test_a_damaged_file_is_refused_and_the_model_left_alone(diagonal_structure, tmp_path, damage):
    path = structurednets.save(compressed(diagonal_structure), tmp_path / "small.safetensors")
    data = path.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "corrupted header": data[:8] + b"#" * 16 + data[24:],
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    skeleton = mlp()
    before = state(skeleton)
    with pytest.raises(CheckpointError, match="small.safetensors"):
        structurednets.load(path, skeleton)
    assert all(isinstance(skeleton[i], nn.Linear) for i in (0, 2, 3))
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())


def test_another_architecture_is_refused_naming_the_module(diagonal_structure, tmp_path):
    path = structurednets.save(compressed(diagonal_structure), tmp_path / "small.safetensors")
    other = nn.Sequential(nn.Linear(24, 32))
    with pytest.raises(CheckpointError, match="module '2'"):
        structurednets.load(path, other)
    assert isinstance(other[0], nn.Linear)
    wrong_width = mlp(width=16)
    with pytest.raises(CheckpointError, match=r"module '0'.*Linear of 16 x 24"):
        structurednets.load(path, wrong_width)
    renamed = nn.Sequential(mlp(), nn.Identity())
    with pytest.raises(CheckpointError, match="module '0'"):
        structurednets.load(path, renamed)


def test_a_foreign_or_unknown_file_is_refused(diagonal_structure, tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"0.weight": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(CheckpointError, match="not written by structurednets.save"):
        structurednets.load(plain, mlp())
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        structurednets.load(tmp_path / "nowhere.safetensors", mlp())
    path = structurednets.save(compressed(diagonal_structure), tmp_path / "small.safetensors")
    with safetensors.torch.safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    header = json.loads(metadata["structurednets"])
    header["layouts"]["0"]["structure"] = "nosuchstructure"
    safetensors.torch.save_file(tensors, str(path), {"structurednets": json.dumps(header)})
    with pytest.raises(CheckpointError, match="module '0'.*nosuchstructure"):
        structurednets.load(path, mlp())


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        structurednets.save({"weight": torch.zeros(2)}, "x.safetensors")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        structurednets.load("x.safetensors", None)


def test_a_single_layer_saves_and_loads_on_its_own(diagonal_structure, tmp_path):
    layer = structurednets.create("diagonal", 12, 10, 0.5)
    path = structurednets.save(layer, tmp_path / "layer.safetensors")
    restored = structurednets.load(path, nn.Linear(12, 10))
    assert isinstance(restored, structurednets.StructuredLayer)
    U = torch.randn(3, 12)
    assert torch.equal(restored(U), layer(U))
