import json

import numpy as np
import pytest
import torch
from torch import nn

import structurednets
from structurednets import Layout
from structurednets.testing import default_dtype
from structurednets_hmat import (
    HMatLayer,
    HMatrixPartition,
    hmat_nb_weight_parameters,
    partition_from_json,
    partition_to_json,
)


def merged_fit(rows=64, cols=48, share=0.3):
    """A layer fitted with merged blocks: leaves of several levels, not the standard ones."""
    index_rows, index_cols = np.arange(rows)[:, None], np.arange(cols)[None, :] * rows / cols
    target = 1.0 / (1.0 + np.abs(index_rows - index_cols))
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        return HMatLayer(
            cols, rows, share, initial_weight_matrix=target, min_block_size=4, merge_blocks=True
        )


def test_layout_form_lists_every_leaf():
    partition = HMatrixPartition.build(40, 24, min_block_size=4)
    ranks = [i % 3 for i in range(len(partition.leaves))]
    dense = [i % 5 == 0 for i in range(len(partition.leaves))]
    ranked = partition.with_ranks(ranks, dense)
    data = partition_to_json(ranked)
    assert (data["output_dim"], data["input_dim"]) == (40, 24)
    assert (data["eta"], data["min_block_size"]) == (0.5, 4)
    assert len(data["leaves"]) == len(partition.leaves)
    for entry, leaf, rank, is_dense in zip(
        data["leaves"], partition.leaves, ranks, dense, strict=True
    ):
        kind = "dense" if is_dense else "lowrank"
        expected_rank = min(leaf.shape) if is_dense else rank
        assert entry == [
            leaf.row_start,
            leaf.row_stop,
            leaf.col_start,
            leaf.col_stop,
            leaf.level,
            leaf.admissible,
            kind,
            expected_rank,
        ]
    assert json.loads(json.dumps(data)) == data
    assert partition_from_json(json.loads(json.dumps(data))) == ranked


def test_merged_fit_restores_from_its_layout():
    layer = merged_fit()
    standard = HMatrixPartition.build(64, 48, min_block_size=4)
    assert len(layer.partition.leaves) < len(standard.leaves)  # merged blocks: a real test
    layout = Layout.from_json(json.dumps(layer.layout.to_json()))
    assert layout == layer.layout
    with default_dtype(torch.float64):
        twin = structurednets.create("hmat", layout=layout)
    assert twin.partition == layer.partition and twin.buckets == layer.buckets
    assert structurednets.nb_parameters("hmat", layout=layout) == layer.get_nb_parameters()
    assert (
        hmat_nb_weight_parameters(48, 64, 0.3, partition=layout.sizes["partition"])
        == layer.nb_weight_parameters
    )
    assert not torch.equal(twin.to_dense(), layer.to_dense())  # random until loaded
    twin.load_state_dict(layer.state_dict())
    U = torch.randn(5, 48, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(twin(U), layer(U))


def test_save_and_load_a_model_with_a_merged_fit(tmp_path):
    def architecture():
        return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 2))

    with default_dtype(torch.float64):
        model = architecture()
        model[0] = merged_fit()
        path = structurednets.save(model, tmp_path / "model.safetensors")
        restored = structurednets.load(path, architecture())
    assert restored[0].partition == model[0].partition
    U = torch.randn(4, 48, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(restored(U), model(U))


def test_loading_another_partition_is_refused():
    layer = merged_fit()
    with default_dtype(torch.float64):
        plain = HMatLayer(48, 64, 0.3, min_block_size=4)
    assert plain.layout.sizes["partition"] != layer.layout.sizes["partition"]
    with pytest.raises(RuntimeError, match=r"sizes\['partition'\]"):
        plain.load_state_dict(layer.state_dict())


def layout_form():
    return partition_to_json(HMatLayer(24, 16, 0.5, min_block_size=4).partition)


def with_leaf(entry, index=0):
    data = layout_form()
    data["leaves"][index] = entry
    return data


def test_bad_layout_forms_name_the_entry():
    good = layout_form()
    first = good["leaves"][0]
    with pytest.raises(
        TypeError,
        match=r"partition must be a structurednets_hmat.HMatrixPartition .* or its layout form",
    ):
        HMatLayer(24, 16, 0.5, partition=[1, 2])
    with pytest.raises(ValueError, match=r"partition must have the keys .*'leaves'"):
        HMatLayer(24, 16, 0.5, partition={key: good[key] for key in good if key != "leaves"})
    with pytest.raises(TypeError, match=r"partition\['leaves'\]\[0\] must be \[row_start"):
        HMatLayer(24, 16, 0.5, partition=with_leaf(first[:5]))
    with pytest.raises(ValueError, match=r"partition\['leaves'\]\[0\]: kind must be one of"):
        HMatLayer(24, 16, 0.5, partition=with_leaf([*first[:6], "sparse", 1]))
    with pytest.raises(TypeError, match=r"partition\['leaves'\]\[0\] must hold non-negative"):
        HMatLayer(24, 16, 0.5, partition=with_leaf([-1, *first[1:]]))
    with pytest.raises(ValueError, match=r"a dense leaf has rank min\(rows, cols\)"):
        HMatLayer(24, 16, 0.5, partition=with_leaf([*first[:6], "dense", 0]))
    with pytest.raises(ValueError, match=r"partition\['min_block_size'\] must be a positive"):
        HMatLayer(24, 16, 0.5, partition={**good, "min_block_size": 0})
    with pytest.raises(ValueError, match="partition is for a 16 x 24 matrix"):
        HMatLayer(16, 24, 0.5, partition=good)


def test_overlapping_leaves_are_refused():
    data = layout_form()
    leaves = data["leaves"]
    # Two same-sized leaves of one block row: the second moved onto the first covers the same
    # number of entries (the partition's own check) but leaves a gap and an overlap.
    first, second = next(
        (a, b)
        for a in leaves
        for b in leaves
        if a is not b and a[:2] == b[:2] and a[3] - a[2] == b[3] - b[2]
    )
    second[2:4] = first[2:4]
    with pytest.raises(ValueError, match=r"partition's leaves must tile the matrix; entry"):
        partition_from_json(data)
