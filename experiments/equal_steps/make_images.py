"""A folder of 32x32 RGB images made offline: crops of scikit-learn's two sample photographs.

    python experiments/equal_steps/make_images.py --out /tmp/equal_steps/images

Writes ``OUT/{train,test}/<photo>/<index>.png`` (the ``folder`` source of
:mod:`vdm_jax.training.sources`): each photograph (``china.jpg`` and ``flower.jpg`` of
``sklearn.datasets.load_sample_images``, 427x640 RGB) is halved in size (2x2 means, to
213x320), then ``--train_per_photo`` 32x32 crops at positions drawn with ``--seed`` from its
left three quarters go to ``train`` and ``--test_per_photo`` crops from its right quarter go
to ``test``, so no test pixel is seen in training. Neighbouring crops overlap: this is a
small, offline stand-in for a data set of natural 32x32 images, not a benchmark data set.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

SIZE = 32


def crops(photo: np.ndarray, count: int, columns: tuple[int, int], rng) -> np.ndarray:
    """``count`` crops uint8 ``[count, 32, 32, 3]`` of ``photo`` whose columns lie in
    ``[columns[0], columns[1])``, at positions drawn from ``rng``."""
    height = photo.shape[0]
    rows = rng.integers(0, height - SIZE + 1, count)
    cols = rng.integers(columns[0], columns[1] - SIZE + 1, count)
    return np.stack([photo[r : r + SIZE, c : c + SIZE] for r, c in zip(rows, cols, strict=True)])


def main(argv=None) -> int:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--train_per_photo", type=int, default=6000)
    p.add_argument("--test_per_photo", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        p.error(f"{args.out} exists; give a new folder")
    rng = np.random.default_rng(args.seed)
    photos = load_sample_images()
    for name, image in zip(photos.filenames, photos.images, strict=True):
        height, width = (s // 2 * 2 for s in image.shape[:2])
        half = image[:height, :width].astype(np.float64)
        half = half.reshape(height // 2, 2, width // 2, 2, 3).mean(axis=(1, 3))
        half = np.round(half).astype(np.uint8)
        split_column = half.shape[1] * 3 // 4
        label = os.path.splitext(os.path.basename(name))[0]
        for split, count, columns in (
            ("train", args.train_per_photo, (0, split_column)),
            ("test", args.test_per_photo, (split_column, half.shape[1])),
        ):
            folder = os.path.join(args.out, split, label)
            os.makedirs(folder)
            for i, crop in enumerate(crops(half, count, columns, rng)):
                Image.fromarray(crop).save(os.path.join(folder, f"{i:05d}.png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
