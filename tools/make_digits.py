"""Regenerate orchestrator/data/digits.parquet from scikit-learn's copy of the UCI digits.

Source: scikit-learn's `load_digits()` (BSD-3-Clause package), the test set of the UCI "Optical
Recognition of Handwritten Digits" data (Alpaydin & Kaynak, 1998; CC BY 4.0): 1,797 8x8 images
of handwritten digits 0-9, pixel values 0..16. We store them scaled to 0..255 as uint8 and fix a
stratified 20% test split (seed 0) so every run evaluates on the same held-out images.

Run once, by hand: `pip install scikit-learn && python tools/make_digits.py`. scikit-learn is
not needed at run time.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits


def main() -> None:
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    split = np.array(["train"] * len(labels), dtype=object)
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        split[idx[: round(0.2 * len(idx))]] = "test"
    table = pa.table({
        "pixels": pa.array([img.tobytes() for img in images], type=pa.binary(64)),
        "label": pa.array(labels),
        "split": pa.array(split.tolist()),
    })
    table = table.replace_schema_metadata({
        "source": "scikit-learn load_digits (UCI Optical Recognition of Handwritten Digits, CC BY 4.0)",
        "shape": "8x8 grayscale uint8",
    })
    out = Path(__file__).resolve().parents[1] / "orchestrator" / "data" / "digits.parquet"
    pq.write_table(table, out, compression="zstd")
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(labels)} images, {int((split == 'test').sum())} test)")


if __name__ == "__main__":
    main()
