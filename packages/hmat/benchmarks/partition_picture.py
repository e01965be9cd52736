"""Draw docs/partition.png: the partitions of two fitted matrices with each leaf's rank.

.venv/bin/python packages/hmat/benchmarks/partition_picture.py
"""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from structurednets.numerics import relative_error
from structurednets_hmat import fit_hmat

SHARE = 0.25
OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "partition.png"


def kernel(rows: int, cols: int) -> np.ndarray:
    """``1 / (1 + |i - j|)`` on the rectangle's own diagonal, in units of the row index."""
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :] * rows / cols
    return 1.0 / (1.0 + np.abs(i - j))


figure, axes = plt.subplots(1, 2, figsize=(11, 5.2), gridspec_kw={"width_ratios": [1, 1.6]})
for ax, (rows, cols) in zip(axes, [(256, 256), (160, 256)], strict=True):
    target = kernel(rows, cols)
    # The plain partition (the default fit's search would merge near-diagonal blocks).
    hmatrix = fit_hmat(target, int(SHARE * rows * cols), min_block_size=16)
    hmatrix.partition.plot(ax)
    error = relative_error(hmatrix.to_dense(), target)
    ax.set_title(
        f"1/(1+|i-j|), {rows} x {cols}, share {SHARE:g}: {len(hmatrix.partition.leaves)} leaves, "
        f"error {error:.1e}",
        fontsize=9,
    )
figure.tight_layout()
figure.savefig(OUTPUT, dpi=80)
print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size // 1024} KiB)")
