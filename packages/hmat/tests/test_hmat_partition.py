import sys

import numpy as np
import pytest

from structurednets_hmat import HMatrixPartition
from structurednets_hmat.partition import dense_rank

SHAPES = [(256, 256), (64, 256), (256, 64), (97, 61), (1, 9), (9, 1), (200, 13)]


def coverage(partition):
    counts = np.zeros(partition.shape, dtype=int)
    for leaf in partition.leaves:
        counts[leaf.rows, leaf.cols] += 1
    return counts


def scaled_box(start, stop, size):
    return (start + 0.5) / size, (stop - 0.5) / size


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eta, min_block_size", [(0.5, 8), (0.25, 4), (2.0, 16)])
def test_leaves_tile_the_matrix_and_respect_admissibility(shape, eta, min_block_size):
    partition = HMatrixPartition.build(*shape, eta=eta, min_block_size=min_block_size)
    assert (coverage(partition) == 1).all()
    for leaf in partition.leaves:
        rows = scaled_box(leaf.row_start, leaf.row_stop, shape[0])
        cols = scaled_box(leaf.col_start, leaf.col_stop, shape[1])
        distance = max(rows[0], cols[0]) - min(rows[1], cols[1])
        diameter = max(rows[1] - rows[0], cols[1] - cols[0])
        if leaf.admissible:
            assert distance > 0 and diameter <= 2 * eta * distance
        else:
            # An inadmissible leaf is one that cannot be split any more.
            assert leaf.nb_rows < 2 * min_block_size and leaf.nb_cols < 2 * min_block_size


def test_square_partition_is_the_textbook_one():
    # 256 indices in clusters of 32: 6 admissible 64 x 64 blocks at level 2, and at level 3
    # the 22 blocks on or next to the diagonal plus 18 admissible ones.
    partition = HMatrixPartition.build(256, 256, eta=0.5, min_block_size=32)
    by_level = {}
    for leaf in partition.leaves:
        by_level.setdefault((leaf.level, leaf.shape, leaf.admissible), []).append(leaf)
    counts = {key: len(value) for key, value in by_level.items()}
    assert counts == {
        (2, (64, 64), True): 6,
        (3, (32, 32), True): 18,
        (3, (32, 32), False): 22,
    }
    for leaf in by_level[(3, (32, 32), False)]:
        assert abs(leaf.row_start - leaf.col_start) <= 32


def test_rectangular_partition_follows_its_own_diagonal():
    partition = HMatrixPartition.build(64, 256, eta=0.5, min_block_size=4)
    transposed = HMatrixPartition.build(256, 64, eta=0.5, min_block_size=4)
    blocks = {(lf.row_start, lf.row_stop, lf.col_start, lf.col_stop) for lf in partition.leaves}
    mirrored = {(lf.col_start, lf.col_stop, lf.row_start, lf.row_stop) for lf in transposed.leaves}
    assert blocks == mirrored
    # The diagonal of the rectangle, (i, 4 i), runs through inadmissible leaves only, and the
    # far corners are covered by large admissible blocks.
    for i in range(64):
        leaf = next(
            lf
            for lf in partition.leaves
            if lf.row_start <= i < lf.row_stop and lf.col_start <= 4 * i < lf.col_stop
        )
        assert not leaf.admissible
    corner = next(lf for lf in partition.leaves if lf.row_start == 0 and lf.col_stop == 256)
    assert corner.admissible and corner.nb_rows >= 16 and corner.nb_cols >= 64


def test_smaller_eta_refines():
    coarse = HMatrixPartition.build(512, 512, eta=2.0, min_block_size=8)
    fine = HMatrixPartition.build(512, 512, eta=0.25, min_block_size=8)
    assert len(fine.leaves) > len(coarse.leaves)


def test_ranks_parameters_and_summary():
    partition = HMatrixPartition.build(96, 80, eta=0.5, min_block_size=8)
    ranks = [leaf_index % 3 for leaf_index in range(len(partition.leaves))]
    dense = [leaf.admissible is False and i % 2 == 0 for i, leaf in enumerate(partition.leaves)]
    ranked = partition.with_ranks(ranks, dense)
    expected = sum(
        leaf.nb_rows * leaf.nb_cols if is_dense else rank * (leaf.nb_rows + leaf.nb_cols)
        for leaf, rank, is_dense in zip(partition.leaves, ranks, dense, strict=True)
    )
    assert ranked.nb_parameters == expected
    assert ranked.dense_flags == tuple(dense)
    assert ranked.ranks == tuple(
        min(leaf.shape) if is_dense else rank
        for leaf, rank, is_dense in zip(partition.leaves, ranks, dense, strict=True)
    )
    assert partition.nb_parameters == 0 and ranked.structure_matches(partition)
    assert ranked.share == pytest.approx(expected / (96 * 80))
    text = ranked.summary()
    assert f"{len(partition.leaves)} leaves, {expected} parameters" in text
    assert "96 x 80" in text and str(ranked) == text
    with pytest.raises(ValueError, match="one rank and one dense flag per leaf"):
        partition.with_ranks(ranks[:-1])
    with pytest.raises(ValueError, match="leaf rank must be in"):
        partition.with_ranks([100] * len(ranks))
    with pytest.raises(TypeError, match="leaf ranks must be integers, got 1.5"):
        partition.with_ranks([1.5] * len(ranks))
    assert partition.with_ranks(np.ones(len(ranks), dtype=np.int64)).ranks == (1,) * len(ranks)


def test_dense_rank():
    assert dense_rank(8, 8) == 4  # rank 4 costs 64 = the dense block
    assert dense_rank(1, 9) == 1
    assert dense_rank(3, 5) == 2  # rank 2 costs 16 >= 15


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="eta must be a positive finite number, got -1"):
        HMatrixPartition.build(8, 8, eta=-1)
    with pytest.raises(TypeError, match="eta must be a positive number"):
        HMatrixPartition.build(8, 8, eta="1")
    with pytest.raises(ValueError, match="min_block_size must be a positive integer, got 0"):
        HMatrixPartition.build(8, 8, min_block_size=0)


def test_plot_writes_the_rank_in_each_block():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partition = HMatrixPartition.build(128, 128, eta=0.5, min_block_size=16)
    ranked = partition.with_ranks(
        [i % 5 for i in range(len(partition.leaves))],
        [i == 0 for i in range(len(partition.leaves))],
    )
    figure, ax = plt.subplots(figsize=(6, 6))
    assert ranked.plot(ax) is ax
    labels = [text.get_text() for text in ax.texts]
    assert len(ax.patches) == len(partition.leaves)
    assert labels == ["D"] + [str(i % 5) for i in range(1, len(partition.leaves))]
    plt.close(figure)


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    partition = HMatrixPartition.build(16, 16)
    with pytest.raises(ImportError, match=r"structurednets-hmat\[plot\]"):
        partition.plot()
