"""The sizes of an H-matrix layer: its partition, every leaf's kind and rank, as data.

``layer.layout.sizes`` is ``{"partition": partition_to_json(layer.partition)}``: the
dimensions, ``eta`` and ``min_block_size`` the blocks were built with, and one entry per leaf,
``[row_start, row_stop, col_start, col_stop, level, admissible, kind, rank]`` with ``kind``
``"lowrank"`` or ``"dense"`` (a dense leaf's rank is ``min(rows, cols)``). ``HMatLayer``'s
``partition=`` and :func:`hmat_nb_weight_parameters` take that form as well as an
:class:`~structurednets_hmat.HMatrixPartition`, so ``structurednets.create("hmat",
layout=fitted.layout)`` builds an unfitted layer of exactly the fitted one's shape.

Without a given partition, the layer's ranks are the random start's
(:func:`~structurednets_hmat.allocate_uniform`) on the blocks ``eta`` and ``min_block_size``
define: :func:`layer_partition`.

>>> partition = layer_partition(64, 64, 0.25, min_block_size=16)
>>> sizes = partition_to_json(partition)
>>> sizes["leaves"][:2]
[[0, 16, 0, 16, 2, False, 'lowrank', 2], [0, 16, 16, 32, 2, False, 'lowrank', 2]]
>>> partition_from_json(sizes) == partition
True
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np

from structurednets.plugin import BudgetTooSmallError, check_positive_int, weight_budget
from structurednets_hmat.allocation import allocate_uniform, smallest_nb_parameters
from structurednets_hmat.hmatrix import HMatrix
from structurednets_hmat.partition import (
    DEFAULT_ETA,
    DEFAULT_MIN_BLOCK_SIZE,
    HMatrixPartition,
    Leaf,
    check_eta,
)

__all__ = [
    "LEAF_KINDS",
    "hmat_nb_weight_parameters",
    "layer_partition",
    "partition_from_json",
    "partition_to_json",
]

LEAF_KINDS = ("lowrank", "dense")
"""The kinds of a leaf in the layout: ``L @ R`` of its rank, or a full block."""

_KEYS = ("output_dim", "input_dim", "eta", "min_block_size", "leaves")


def partition_to_json(partition: HMatrixPartition) -> dict[str, object]:
    """The partition with its ranks as JSON values; :func:`partition_from_json` inverts it."""
    return {
        "output_dim": partition.output_dim,
        "input_dim": partition.input_dim,
        "eta": partition.eta,
        "min_block_size": partition.min_block_size,
        "leaves": [
            [
                leaf.row_start,
                leaf.row_stop,
                leaf.col_start,
                leaf.col_stop,
                leaf.level,
                leaf.admissible,
                "dense" if leaf.dense else "lowrank",
                leaf.rank,
            ]
            for leaf in partition.leaves
        ],
    }


def partition_from_json(data: Mapping[str, object], name: str = "partition") -> HMatrixPartition:
    """The :class:`HMatrixPartition` written by :func:`partition_to_json`.

    Raises ``TypeError``/``ValueError`` naming the entry (e.g. ``partition['leaves'][3]``)
    that is malformed, and ``ValueError`` when the leaves do not tile the matrix.
    """
    if not isinstance(data, Mapping):
        raise TypeError(
            f"{name} must be an HMatrixPartition or its layout form (a dict with keys "
            f"{list(_KEYS)}), got {type(data).__name__}"
        )
    if sorted(data) != sorted(_KEYS):
        raise ValueError(f"{name} must have the keys {list(_KEYS)}, got {sorted(data)}")
    output_dim = check_positive_int(f"{name}['output_dim']", data["output_dim"])
    input_dim = check_positive_int(f"{name}['input_dim']", data["input_dim"])
    eta = check_eta(data["eta"])
    min_block_size = check_positive_int(f"{name}['min_block_size']", data["min_block_size"])
    entries = data["leaves"]
    if isinstance(entries, (str, bytes, Mapping)) or not hasattr(entries, "__len__"):
        raise TypeError(f"{name}['leaves'] must be a list, got {type(entries).__name__}")
    leaves = tuple(_leaf(entry, f"{name}['leaves'][{i}]") for i, entry in enumerate(entries))
    partition = HMatrixPartition(output_dim, input_dim, eta, min_block_size, leaves)
    _check_tiling(partition, name)
    return partition


def _leaf(entry: object, where: str) -> Leaf:
    if isinstance(entry, (str, bytes, Mapping)) or not hasattr(entry, "__len__") or len(entry) != 8:
        raise TypeError(
            f"{where} must be [row_start, row_stop, col_start, col_stop, level, admissible, "
            f"kind, rank], got {entry!r}"
        )
    *ranges, level, admissible, kind, rank = entry
    for value in (*ranges, level, rank):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise TypeError(f"{where} must hold non-negative integer positions, got {entry!r}")
    if not isinstance(admissible, bool):
        raise TypeError(f"{where}: admissible must be True or False, got {admissible!r}")
    if kind not in LEAF_KINDS:
        raise ValueError(f"{where}: kind must be one of {list(LEAF_KINDS)}, got {kind!r}")
    leaf = Leaf(
        *(int(value) for value in ranges), int(level), admissible, int(rank), kind == "dense"
    )
    if leaf.dense and leaf.rank != min(leaf.shape):
        raise ValueError(f"{where}: a dense leaf has rank min(rows, cols), got {entry!r}")
    return leaf


def _check_tiling(partition: HMatrixPartition, name: str) -> None:
    """No entry of the matrix in two leaves: with the total the partition checks (the leaves
    cover as many entries as the matrix has), each entry is in exactly one leaf."""
    covered = np.zeros(partition.shape, dtype=bool)
    for index, leaf in enumerate(partition.leaves):
        block = covered[leaf.rows, leaf.cols]
        if block.any():
            row, col = np.argwhere(block)[0]
            raise ValueError(
                f"{name}'s leaves must tile the matrix; entry ({leaf.row_start + row}, "
                f"{leaf.col_start + col}) lies in leaf {index} and in an earlier one"
            )
        block[...] = True


def given_partition(hmatrix: object, partition: object) -> HMatrixPartition | None:
    """The partition of ``hmatrix`` or ``partition`` (either form), checked; or ``None``."""
    if hmatrix is not None and partition is not None:
        raise ValueError("pass either hmatrix or partition, not both")
    if hmatrix is not None:
        if not isinstance(hmatrix, HMatrix):
            raise TypeError(
                "hmatrix must be a structurednets_hmat.HMatrix (e.g. from "
                f"structurednets_hmat.fit_hmat or layer.to_hmatrix()), got {type(hmatrix).__name__}"
            )
        return hmatrix.partition
    if partition is None or isinstance(partition, HMatrixPartition):
        return partition
    if isinstance(partition, Mapping):
        return partition_from_json(partition)
    raise TypeError(
        "partition must be a structurednets_hmat.HMatrixPartition (e.g. layer.partition) or "
        "its layout form (layer.layout.sizes['partition']), got "
        f"{type(partition).__name__}"
    )


def block_partition(
    input_dim: int,
    output_dim: int,
    eta: float | None,
    min_block_size: int | None,
    given: HMatrixPartition | None = None,
    given_name: str = "partition",
) -> HMatrixPartition:
    """The given partition (checked against the dims and options), or the one they define."""
    if given is None:
        return HMatrixPartition.build(
            output_dim,
            input_dim,
            DEFAULT_ETA if eta is None else eta,
            DEFAULT_MIN_BLOCK_SIZE if min_block_size is None else min_block_size,
        )
    if given.shape != (output_dim, input_dim):
        raise ValueError(
            f"{given_name} is for a {given.output_dim} x {given.input_dim} matrix, but the layer's "
            f"weight is {output_dim} x {input_dim} (output_dim x input_dim)"
        )
    if eta is not None and check_eta(eta) != given.eta:
        raise ValueError(f"eta={eta!r} disagrees with the eta of {given_name} ({given.eta:g})")
    if min_block_size is not None and (
        check_positive_int("min_block_size", min_block_size) != given.min_block_size
    ):
        raise ValueError(
            f"min_block_size={min_block_size!r} disagrees with {given_name}'s "
            f"({given.min_block_size})"
        )
    return given


def layer_partition(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    eta: float | None = None,
    min_block_size: int | None = None,
    hmatrix: HMatrix | None = None,
    partition: HMatrixPartition | Mapping[str, object] | None = None,
    merge_blocks: bool | None = None,
) -> HMatrixPartition:
    """The partition with ranks of an :class:`HMatLayer` built with these arguments and no
    weight matrix.

    That is the ranks of ``hmatrix`` or ``partition`` when given, else the random start's
    allocation (:func:`~structurednets_hmat.allocate_uniform`) on the partition that ``eta`` and
    ``min_block_size`` define. Raises :class:`BudgetTooSmallError` when the budget cannot hold
    it, or cannot hold rank 1 in every block.
    """
    if merge_blocks is not None and merge_blocks is not False:
        raise ValueError(
            f"merge_blocks={merge_blocks!r} applies only to fitting initial_weight_matrix"
        )
    given = given_partition(hmatrix, partition)
    name = "hmatrix" if hmatrix is not None else "partition"
    blocks = block_partition(input_dim, output_dim, eta, min_block_size, given, name)
    budget = weight_budget(input_dim, output_dim, nb_params_share)
    if given is not None:
        if given.nb_parameters > budget:
            raise BudgetTooSmallError(
                "hmat",
                input_dim,
                output_dim,
                nb_params_share,
                given.nb_parameters,
                f"the given {name}",
            )
        return given
    needed = smallest_nb_parameters(blocks)
    if needed > budget:
        raise BudgetTooSmallError(
            "hmat",
            input_dim,
            output_dim,
            nb_params_share,
            needed,
            f"rank 1 in each of its {len(blocks.leaves)} blocks (eta={blocks.eta:g}, "
            f"min_block_size={blocks.min_block_size})",
        )
    return allocate_uniform(blocks, budget)


def require_one_block(
    blocks: HMatrixPartition, input_dim: int, output_dim: int, nb_params_share: float
) -> None:
    """A fitted layer may leave blocks at rank 0, but needs room for one block of rank 1."""
    needed = min(
        min(leaf.nb_rows + leaf.nb_cols, leaf.nb_rows * leaf.nb_cols) for leaf in blocks.leaves
    )
    if needed > weight_budget(input_dim, output_dim, nb_params_share):
        raise BudgetTooSmallError(
            "hmat", input_dim, output_dim, nb_params_share, needed, "its smallest block at rank 1"
        )


def hmat_nb_weight_parameters(
    input_dim: int,
    output_dim: int,
    nb_params_share: float,
    *,
    eta: float | None = None,
    min_block_size: int | None = None,
    hmatrix: HMatrix | None = None,
    partition: HMatrixPartition | Mapping[str, object] | None = None,
    merge_blocks: bool | None = None,
    max_cost_ratio: float | None = None,
) -> int:
    """Weight scalars of an :class:`HMatLayer` built with these arguments and no weight
    matrix; exact for a fitted layer's ``partition`` (or its layout). ``max_cost_ratio`` (a
    fit control) is accepted and ignored."""
    return layer_partition(
        input_dim,
        output_dim,
        nb_params_share,
        eta=eta,
        min_block_size=min_block_size,
        hmatrix=hmatrix,
        partition=partition,
        merge_blocks=merge_blocks,
    ).nb_parameters
