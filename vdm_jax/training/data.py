"""Input pipelines: image sources and grain iterators for training and evaluation.

This module knows nothing about configs: every function takes plain arguments, and the
experiment layer reads the config and calls them.

**Sources.** A *source* is a random-access sequence of records (``len(source)`` and
``source[i]``), each record a dict::

    {"image": uint8 array [H, W, C], "label": int32 array []}

Images are never rescaled: pixel values are the data's own integers in ``0..vocab_size-1``
(256 levels for 8-bit images, 17 for the scikit-learn digits). Grey images keep ``C = 1``.
Every source made here carries a :class:`DatasetInfo` as ``source.info`` (image shape,
vocabulary size, number of classes) and a ``repr`` that names it without machine-specific
paths. The sources are

* :func:`digits_source`: the 8x8 digits bundled with scikit-learn (offline default);
* :func:`tfds_source`: cifar10, mnist, imagenet32, imagenet64 through ``tfds.data_source``
  (TensorFlow is needed only once, to prepare the data set in the ``array_record`` format);
* :func:`folder_source`: a folder ``root/{train,test}/<class>/*.png|jpg|jpeg``;
* :func:`array_source`: images and labels held in memory as numpy arrays;
* :func:`make_source`: any of the named ones by name (the entry point for configs).

**Iterators.** :func:`make_train_iterator` gives an endless, shuffled stream of fixed-size
global batches that depends only on the source length, seed and batch size; each process
yields its contiguous slice of every global batch, so any number of processes trains on the
same data. Its position (``get_state`` / ``set_state``) does not depend on the number of
processes either: a resumed run sees exactly the batches it would have seen.
:func:`make_eval_iterator` gives one exact pass over a split: every example once, the last
batch padded and marked by a boolean ``"mask"``, and the same number of batches on every
process (as a multi-host evaluation step needs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from PIL import Image

__all__ = [
    "DIGITS_NUM_TEST",
    "DIGITS_NUM_TRAIN",
    "DIGITS_VOCAB_SIZE",
    "IMAGE_EXTENSIONS",
    "KNOWN_DATASETS",
    "TFDS_DATASETS",
    "ArraySource",
    "DatasetInfo",
    "FolderSource",
    "ImageSource",
    "TfdsSource",
    "TrainIterator",
    "array_source",
    "dataset_info",
    "digits_source",
    "folder_source",
    "make_eval_iterator",
    "make_source",
    "make_train_iterator",
    "num_eval_batches",
    "tfds_source",
]

Record = dict[str, np.ndarray]

#: Grey levels of the scikit-learn digits (pixel values 0..16).
DIGITS_VOCAB_SIZE = 17
#: Size of the deterministic digits training split (the first part of a seed-0 permutation).
DIGITS_NUM_TRAIN = 1500
#: Size of the deterministic digits test split (the remaining 1797 - 1500 examples).
DIGITS_NUM_TEST = 297
_DIGITS_SPLIT_SEED = 0

#: File extensions (lower case) that :func:`folder_source` reads.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set that a model needs before it sees data.

    Attributes:
      name: the data set's name, e.g. ``"cifar10"`` or ``"digits"``.
      image_shape: ``(H, W, C)`` of every image.
      vocab_size: number of pixel values; images hold integers in ``0..vocab_size-1``
        (256 for 8-bit images, 17 for the digits).
      num_classes: number of distinct labels (1 for unlabelled data, whose label is 0).
    """

    name: str
    image_shape: tuple[int, int, int]
    vocab_size: int
    num_classes: int


class ImageSource(Protocol):
    """What the iterators need from a source: ``len`` and ``source[i] -> record``.

    ``source[i]`` returns ``{"image": uint8 [H, W, C], "label": int32 []}``. The sources made
    in this module also have ``info: DatasetInfo``; the iterators do not require it.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


def _check_split(split: str, where: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"{where}: split must be one of {_SPLITS}, got {split!r}")


def _check_index(index: int, n: int, where: str) -> int:
    index = int(index)
    if not -n <= index < n:
        raise IndexError(f"{where}: index {index} out of range for {n} records")
    return index % n


# ---------------------------------------------------------------------------------------------
# In-memory arrays (and the digits).


class ArraySource:
    """Random-access source over in-memory numpy arrays; build it with :func:`array_source`.

    Attributes:
      images: uint8 array [N, H, W, C].
      labels: int32 array [N].
      info: the :class:`DatasetInfo`.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, info: DatasetInfo):
        self.images = images
        self.labels = labels
        self.info = info

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Record:
        index = _check_index(index, len(self), repr(self))
        return {"image": self.images[index], "label": self.labels[index]}

    def __repr__(self) -> str:
        return (
            f"ArraySource(name={self.info.name!r}, num_records={len(self)}, "
            f"image_shape={self.info.image_shape}, vocab_size={self.info.vocab_size})"
        )


def array_source(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    vocab_size: int = 256,
    num_classes: int | None = None,
    name: str = "arrays",
) -> ArraySource:
    """Wraps in-memory images (and labels) as a source.

    Args:
      images: uint8 array [N, H, W, C] or [N, H, W] (grey; a channel axis of 1 is added).
        Values must be below ``vocab_size``. Not copied when already uint8 and contiguous.
      labels: integer array [N] of non-negative labels, or None for all-zero labels.
      vocab_size: number of pixel values, in 2..256.
      num_classes: number of classes; defaults to ``max(labels) + 1`` (1 without labels).
      name: the name reported in ``info`` and ``repr``.

    Returns:
      An :class:`ArraySource` whose records are ``{"image": uint8 [H, W, C],
      "label": int32 []}``.

    Raises:
      ValueError: wrong dtype or rank, empty images, mismatched lengths, pixel values not
        below ``vocab_size``, negative labels or labels not below ``num_classes``.
    """
    if not 2 <= int(vocab_size) <= 256:
        raise ValueError(f"array_source: vocab_size must be in 2..256, got {vocab_size}")
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"array_source: images must have dtype uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(
            f"array_source: images must be [N, H, W, C] or [N, H, W], got shape {images.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"array_source: no images (shape {images.shape})")
    images = np.ascontiguousarray(images)
    if int(images.max()) >= vocab_size:
        raise ValueError(
            f"array_source: pixel value {int(images.max())} is not below vocab_size={vocab_size}"
        )
    n = images.shape[0]
    if labels is None:
        labels = np.zeros((n,), np.int32)
    else:
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"array_source: labels must be integers, got dtype {labels.dtype}")
        if labels.ndim != 1:
            raise ValueError(f"array_source: labels must be [N], got shape {labels.shape}")
        if labels.shape[0] != n:
            raise ValueError(
                f"array_source: {n} images but {labels.shape[0]} labels; lengths must match"
            )
        if labels.min() < 0:
            raise ValueError(f"array_source: labels must be >= 0, got {int(labels.min())}")
        if labels.max() > np.iinfo(np.int32).max:
            raise ValueError(f"array_source: label {int(labels.max())} does not fit in int32")
        labels = labels.astype(np.int32)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif int(labels.max()) >= num_classes:
        raise ValueError(
            f"array_source: label {int(labels.max())} is not below num_classes={num_classes}"
        )
    info = DatasetInfo(
        name=name,
        image_shape=tuple(int(d) for d in images.shape[1:]),
        vocab_size=int(vocab_size),
        num_classes=int(num_classes),
    )
    return ArraySource(images, labels, info)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported when first needed (slow import)

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values 0..16, exact in float64
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(images.shape[0])
    images, labels = images[order], labels[order]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_source(split: str) -> ArraySource:
    """The 8x8 handwritten digits bundled with scikit-learn (no download): the offline default.

    The 1797 images hold integers 0..16 (17 grey levels, ``vocab_size`` 17), kept as they are
    (not rescaled to 0..255). They are split deterministically: a permutation drawn with
    ``numpy.random.default_rng(0)``; its first 1500 examples are ``"train"``, the remaining
    297 ``"test"``.

    Args:
      split: ``"train"`` or ``"test"``.

    Returns:
      An :class:`ArraySource` named ``"digits"`` with records ``{"image": uint8 [8, 8, 1],
      "label": int32 []}`` (labels 0..9).
    """
    _check_split(split, "digits_source")
    images, labels = _digits_arrays()
    part = slice(0, DIGITS_NUM_TRAIN) if split == "train" else slice(DIGITS_NUM_TRAIN, None)
    return array_source(
        images[part], labels[part], vocab_size=DIGITS_VOCAB_SIZE, num_classes=10, name="digits"
    )


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets.


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
    tfds_name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    has_label: bool
    split_names: Mapping[str, str]


_SAME_SPLITS = {"train": "train", "test": "test"}
# The downsampled ImageNet builders have no "test" split: their "validation" is the test set.
_IMAGENET_SPLITS = {"train": "train", "test": "validation"}

#: Short names accepted by :func:`tfds_source`, and the tfds builders they read.
TFDS_DATASETS: Mapping[str, str] = {
    "cifar10": "cifar10",
    "mnist": "mnist",
    "imagenet32": "downsampled_imagenet/32x32",
    "imagenet64": "downsampled_imagenet/64x64",
}

_TFDS_SPECS = {
    "cifar10": _TfdsSpec("cifar10", (32, 32, 3), 10, True, _SAME_SPLITS),
    "mnist": _TfdsSpec("mnist", (28, 28, 1), 10, True, _SAME_SPLITS),
    "imagenet32": _TfdsSpec("downsampled_imagenet/32x32", (32, 32, 3), 1, False, _IMAGENET_SPLITS),
    "imagenet64": _TfdsSpec("downsampled_imagenet/64x64", (64, 64, 3), 1, False, _IMAGENET_SPLITS),
}

#: Every name :func:`make_source` and :func:`dataset_info` accept.
KNOWN_DATASETS = ("digits", *TFDS_DATASETS, "folder")


class TfdsSource:
    """Source over a ``tfds.data_source``; build it with :func:`tfds_source`.

    Attributes:
      name: the short name (e.g. ``"imagenet32"``).
      split: the split asked for (e.g. ``"test"``).
      tfds_split: the split read from tfds (``"validation"`` for ImageNet's ``"test"``).
      info: the :class:`DatasetInfo`.
    """

    def __init__(self, name: str, split: str, data_source: Sequence[Any], tfds_split: str):
        self.name = name
        self.split = split
        self.tfds_split = tfds_split
        self._spec = _TFDS_SPECS[name]
        self._data_source = data_source
        self._len = len(data_source)
        self.info = DatasetInfo(name, self._spec.image_shape, 256, self._spec.num_classes)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Record:
        index = _check_index(index, self._len, repr(self))
        example = self._data_source[index]
        image = np.asarray(example["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != self._spec.image_shape:
            raise ValueError(
                f"{self!r}: record {index} has image shape {image.shape}, expected "
                f"{self._spec.image_shape}"
            )
        label = example["label"] if self._spec.has_label else 0
        return {"image": image, "label": np.asarray(label, dtype=np.int32)}

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self.name!r}, tfds_name={self._spec.tfds_name!r}, "
            f"split={self.tfds_split!r}, num_records={self._len})"
        )


def tfds_source(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None, download: bool = False
) -> TfdsSource:
    """Opens a TensorFlow Datasets split for random access through ``tfds.data_source``.

    The data set must have been prepared in the ``array_record`` file format, e.g.
    ``tfds build cifar10 --data_dir=DIR --file_format=array_record`` (the only step that
    needs TensorFlow). Reading needs only numpy and pillow.

    Args:
      name: one of ``"cifar10"``, ``"mnist"``, ``"imagenet32"`` (tfds
        ``downsampled_imagenet/32x32``), ``"imagenet64"`` (``downsampled_imagenet/64x64``).
      split: ``"train"``, ``"test"`` or a tfds split expression such as ``"train[:1000]"``.
        For the ImageNet sets, which have no test split, ``"test"`` reads ``"validation"``.
      data_dir: the tfds data directory; None for the tfds default (``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``). A local directory must exist.
      download: let tfds try to download and prepare the data (needs TensorFlow and internet).

    Returns:
      A :class:`TfdsSource` with records ``{"image": uint8 [H, W, C], "label": int32 []}``:
      cifar10 [32, 32, 3], mnist [28, 28, 1], imagenet32 [32, 32, 3], imagenet64
      [64, 64, 3]. The ImageNet sets have no label: it is 0.

    Raises:
      ValueError: unknown name, missing ``data_dir``, or tfds cannot open the split.
    """
    if name not in _TFDS_SPECS:
        raise ValueError(
            f"tfds_source: unknown data set {name!r}; known tfds data sets: {sorted(_TFDS_SPECS)}"
        )
    if not isinstance(split, str) or not split:
        raise ValueError(f"tfds_source: split must be a non-empty string, got {split!r}")
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if "://" not in data_dir and not os.path.isdir(data_dir):
            raise ValueError(f"tfds_source: data_dir {data_dir!r} does not exist")
    spec = _TFDS_SPECS[name]
    tfds_split = spec.split_names.get(split, split)

    import tensorflow_datasets as tfds  # imported when first needed

    try:
        data_source = tfds.data_source(
            spec.tfds_name, split=tfds_split, data_dir=data_dir, download=download
        )
    except Exception as e:
        raise ValueError(
            f"tfds_source: cannot open tfds data set {spec.tfds_name!r} (name {name!r}), split "
            f"{tfds_split!r}, data_dir {data_dir!r}: {type(e).__name__}: {e}\n"
            "tfds.data_source reads data prepared in the array_record format: run "
            f"`tfds build {spec.tfds_name} --data_dir=DIR --file_format=array_record` once "
            "(this step needs TensorFlow)."
        ) from e
    return TfdsSource(name, split, data_source, tfds_split)


# ---------------------------------------------------------------------------------------------
# A folder of images.

_GREY_MODES = frozenset({"1", "L", "LA", "La"})
_COLOUR_MODES = frozenset({"P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})


def _open_image(path: str) -> Image.Image:
    try:
        return Image.open(path)
    except Exception as e:  # UnidentifiedImageError, OSError, ...
        raise ValueError(f"cannot read image file {path!r}: {type(e).__name__}: {e}") from e


class FolderSource:
    """Source over image files; build it with :func:`folder_source`.

    Attributes:
      root: the folder holding the split folders.
      split: ``"train"`` or ``"test"``.
      classes: class names (sorted); ``label`` is the index in this tuple.
      files: the image paths, in order (by class, then by file name).
      info: the :class:`DatasetInfo`.
    """

    def __init__(
        self,
        root: str,
        split: str,
        classes: tuple[str, ...],
        files: tuple[str, ...],
        labels: np.ndarray,
        info: DatasetInfo,
    ):
        self.root = root
        self.split = split
        self.classes = classes
        self.files = files
        self._labels = labels
        self.info = info
        self._pil_mode = "L" if info.image_shape[2] == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Record:
        index = _check_index(index, len(self.files), repr(self))
        path = self.files[index]
        with _open_image(path) as im:
            try:
                image = np.asarray(im.convert(self._pil_mode), dtype=np.uint8)
            except Exception as e:  # truncated or corrupt pixel data
                raise ValueError(
                    f"cannot decode image file {path!r}: {type(e).__name__}: {e}"
                ) from e
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != self.info.image_shape:
            raise ValueError(
                f"image file {path!r} decoded to shape {image.shape}, expected "
                f"{self.info.image_shape}"
            )
        return {"image": image, "label": self._labels[index]}

    def __repr__(self) -> str:
        # No absolute path: the data may move between runs without changing this repr.
        return (
            f"FolderSource(root_name={os.path.basename(self.root)!r}, split={self.split!r}, "
            f"num_records={len(self)}, image_shape={self.info.image_shape}, "
            f"num_classes={len(self.classes)})"
        )


def _list_dirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def folder_source(root: str | os.PathLike, split: str) -> FolderSource:
    """Reads a folder of images laid out as ``root/{train,test}/<class>/<file>``.

    Files ending in ``.png``, ``.jpg`` or ``.jpeg`` (any case) are read with pillow; other
    files and hidden entries are ignored. The classes are the sorted union of the class
    folders of ``root/train`` and ``root/test`` (so a label means the same class in both
    splits); ``label`` is the class's index. Building the source reads every file's header
    (size and mode, not the pixels) to check that all images have one size. Images are grey
    (``C = 1``) when every file is grey (modes ``1``, ``L``, ``LA``), otherwise all are read
    as RGB (``C = 3``; an alpha channel is dropped). Pixel values are 8-bit: ``vocab_size``
    256.

    Args:
      root: the folder holding the split folders.
      split: ``"train"`` or ``"test"``.

    Returns:
      A :class:`FolderSource` with records ``{"image": uint8 [H, W, C], "label": int32 []}``.

    Raises:
      ValueError: missing ``root`` or split folder, no class folders or no image files,
        images of two sizes (naming both sizes and a file of each), an unreadable or corrupt
        file (naming it; a file whose header reads but whose pixels do not fails when read),
        or an image mode that is not 8-bit.
    """
    _check_split(split, "folder_source")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"folder_source: image folder {root!r} does not exist")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise ValueError(f"folder_source: split folder {split_dir!r} does not exist")
    classes = sorted(
        {
            c
            for s in _SPLITS
            if os.path.isdir(os.path.join(root, s))
            for c in _list_dirs(os.path.join(root, s))
        }
    )
    files: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        cls_dir = os.path.join(split_dir, cls)
        if not os.path.isdir(cls_dir):
            continue
        names = sorted(
            e.name
            for e in os.scandir(cls_dir)
            if e.is_file()
            and not e.name.startswith(".")
            and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        files.extend(os.path.join(cls_dir, n) for n in names)
        labels.extend([label] * len(names))
    if not files:
        raise ValueError(
            f"folder_source: no image files ({'/'.join(IMAGE_EXTENSIONS)}) in class folders "
            f"of {split_dir!r} (expected {split_dir}/<class>/<image>)"
        )

    size = None
    first_file = None
    grey = True
    for path in files:
        with _open_image(path) as im:
            this_size, mode = im.size, im.mode
        if mode not in _GREY_MODES and mode not in _COLOUR_MODES:
            raise ValueError(
                f"folder_source: image file {path!r} has mode {mode!r}; only 8-bit images "
                f"are supported (modes {sorted(_GREY_MODES | _COLOUR_MODES)})"
            )
        grey = grey and mode in _GREY_MODES
        if size is None:
            size, first_file = this_size, path
        elif this_size != size:
            raise ValueError(
                f"folder_source: images have different sizes: {first_file!r} is "
                f"{size[0]}x{size[1]} (WxH) but {path!r} is {this_size[0]}x{this_size[1]}"
            )
    width, height = size
    info = DatasetInfo(
        name="folder",
        image_shape=(height, width, 1 if grey else 3),
        vocab_size=256,
        num_classes=len(classes),
    )
    return FolderSource(
        root, split, tuple(classes), tuple(files), np.asarray(labels, np.int32), info
    )


# ---------------------------------------------------------------------------------------------
# By name.


def make_source(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None
) -> ArraySource | TfdsSource | FolderSource:
    """Builds a named source: the entry point for configs.

    Args:
      name: one of :data:`KNOWN_DATASETS`: ``"digits"``, ``"cifar10"``, ``"mnist"``,
        ``"imagenet32"``, ``"imagenet64"``, ``"folder"``.
      split: ``"train"`` or ``"test"`` (tfds names also take tfds split expressions).
      data_dir: for tfds names the tfds data directory (None: tfds default); for
        ``"folder"`` the image folder (required); ignored for ``"digits"``.

    Returns:
      The source; records are ``{"image": uint8 [H, W, C], "label": int32 []}`` and
      ``source.info`` is its :class:`DatasetInfo`.

    Raises:
      ValueError: unknown name (listing the known ones), or whatever the chosen source
        rejects.
    """
    if name == "digits":
        return digits_source(split)
    if name in _TFDS_SPECS:
        return tfds_source(name, split, data_dir=data_dir)
    if name == "folder":
        if data_dir is None:
            raise ValueError("make_source: name 'folder' needs data_dir (the image folder)")
        return folder_source(data_dir, split)
    raise ValueError(f"make_source: unknown data set {name!r}; known: {list(KNOWN_DATASETS)}")


def dataset_info(name: str, *, data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` (image shape, vocabulary size, classes) of a named data set.

    Reads no data except for ``"folder"``, whose train split is scanned (file headers only).

    Args:
      name: one of :data:`KNOWN_DATASETS`.
      data_dir: the image folder for ``"folder"``; ignored otherwise.

    Returns:
      e.g. ``DatasetInfo("digits", (8, 8, 1), 17, 10)`` or
      ``DatasetInfo("cifar10", (32, 32, 3), 256, 10)``.

    Raises:
      ValueError: unknown name (listing the known ones), or ``"folder"`` without a valid
        ``data_dir``.
    """
    if name == "digits":
        return DatasetInfo("digits", (8, 8, 1), DIGITS_VOCAB_SIZE, 10)
    if name in _TFDS_SPECS:
        spec = _TFDS_SPECS[name]
        return DatasetInfo(name, spec.image_shape, 256, spec.num_classes)
    if name == "folder":
        return make_source("folder", "train", data_dir=data_dir).info
    raise ValueError(f"dataset_info: unknown data set {name!r}; known: {list(KNOWN_DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Iterators.


def _process_index_and_count(
    process_index: int | None, process_count: int | None, where: str
) -> tuple[int, int]:
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    process_index, process_count = int(process_index), int(process_count)
    if process_count <= 0:
        raise ValueError(f"{where}: process_count must be positive, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"{where}: process_index must be in [0, {process_count}), got {process_index}"
        )
    return process_index, process_count


def _per_process_batch_size(global_batch_size: int, process_count: int, where: str) -> int:
    if global_batch_size <= 0:
        raise ValueError(f"{where}: global_batch_size must be positive, got {global_batch_size}")
    if global_batch_size % process_count:
        raise ValueError(
            f"{where}: global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}"
        )
    return global_batch_size // process_count


_TRAIN_STATE_FORMAT = "vdm_jax.training.data.make_train_iterator/1"
# The fields a saved position is only valid for; checked by TrainIterator.set_state.
_TRAIN_STATE_KEYS = ("num_records", "seed", "global_batch_size", "shuffle")
# Stop of the batch range of an endless iterator: far beyond any run, and small enough that
# stream positions (batch index * global_batch_size) stay well inside int64.
_ENDLESS = 2**62
# Epoch permutations kept per reader: prefetching threads may straddle an epoch boundary.
_CACHED_EPOCHS = 3


def _read_records(source: ImageSource, indices: np.ndarray) -> Record:
    """Reads records ``indices`` (int64 [b]) and stacks them into one batch."""
    if isinstance(source, ArraySource):
        # In memory: one gather instead of b dicts and a stack.
        return {"image": source.images[indices], "label": source.labels[indices]}
    records = [source[int(i)] for i in indices]
    return {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]}


class _TrainBatchReader:
    """Maps a global batch index ``k`` to this process's slice of global batch ``k``.

    Picklable (grain's worker processes get a copy); the permutation cache and its lock are
    rebuilt in each copy.
    """

    def __init__(
        self,
        source: ImageSource,
        *,
        num_records: int,
        seed: int,
        shuffle: bool,
        global_batch_size: int,
        offset: int,
        batch_size: int,
    ):
        self.source = source
        self.num_records = num_records
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch_size = global_batch_size
        self.offset = offset
        self.batch_size = batch_size
        self._init_cache()

    def _init_cache(self) -> None:
        self._permutations: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_permutations"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def permutation(self, epoch: int) -> np.ndarray:
        """The record order of ``epoch``: int64 [num_records]."""
        with self._lock:
            perm = self._permutations.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
                self._permutations[epoch] = perm
                while len(self._permutations) > _CACHED_EPOCHS:
                    del self._permutations[min(self._permutations)]
            return perm

    def record_indices(self, k: int) -> np.ndarray:
        """The records of this process's slice of global batch ``k``: int64 [b]."""
        start = int(k) * self.global_batch_size + self.offset
        positions = np.arange(start, start + self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_records)
        if not self.shuffle:
            return offsets
        indices = np.empty_like(offsets)
        # One or two epochs unless the batch is larger than the source.
        for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
            here = epochs == epoch
            indices[here] = self.permutation(epoch)[offsets[here]]
        return indices

    def __call__(self, k: int) -> Record:
        return _read_records(self.source, self.record_indices(k))


class TrainIterator:
    """The iterator :func:`make_train_iterator` returns (see there for the batch order).

    Iterate it for batches; ``get_state()`` / ``set_state(state)`` save and restore its
    position independently of the number of processes; ``close()`` stops grain's threads and
    worker processes now rather than when grain's iterator is garbage-collected.

    Attributes:
      num_records: ``len(source)``.
      seed: the shuffle seed.
      shuffle: whether epochs are shuffled.
      global_batch_size: ``B``, examples per global batch over all processes.
      batch_size: ``b = B // process_count``, examples per batch of this process.
      process_index: this process's index ``p``.
      process_count: the number of processes ``n``.
      num_batches: global batches in the whole stream; None when endless.
    """

    def __init__(
        self,
        source: ImageSource,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int,
        process_count: int,
        shuffle: bool,
        num_batches: int | None,
        worker_count: int,
        worker_buffer_size: int,
        read_options: grain.ReadOptions,
    ):
        self.num_records = len(source)
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.process_count = process_count
        self.num_batches = num_batches
        self._reader = _TrainBatchReader(
            source,
            num_records=self.num_records,
            seed=seed,
            shuffle=shuffle,
            global_batch_size=global_batch_size,
            offset=process_index * self.batch_size,
            batch_size=self.batch_size,
        )
        self._worker_count = worker_count
        self._worker_buffer_size = worker_buffer_size
        self._read_options = read_options
        self._next_batch = 0
        # Started lazily, so that set_state before the first batch reads nothing twice.
        self._batches: Iterator[Record] | None = None

    @property
    def next_batch_index(self) -> int:
        """Index ``k`` of the global batch the next ``next()`` returns a slice of."""
        return self._next_batch

    def _start(self) -> Iterator[Record]:
        stop = _ENDLESS // self.global_batch_size if self.num_batches is None else self.num_batches
        ds = grain.MapDataset.range(self._next_batch, max(self._next_batch, stop))
        ds = ds.map(self._reader).to_iter_dataset(self._read_options)
        if self._worker_count > 0:
            # Workers take whole batches round-robin and grain returns them in order, so the
            # batches do not depend on worker_count.
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self._worker_count,
                    per_worker_buffer_size=self._worker_buffer_size,
                )
            )
        return iter(ds)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Record:
        if self._batches is None:
            self._batches = self._start()
        try:
            batch = next(self._batches)
        except StopIteration:
            raise
        except BaseException:
            # grain has moved past the failed batch; restart so that a retry reads it again.
            self.close()
            raise
        self._next_batch += 1
        return batch

    def close(self) -> None:
        """Stops prefetching (threads and worker processes); iterating again restarts it."""
        batches, self._batches = self._batches, None
        if batches is not None and hasattr(batches, "close"):
            batches.close()

    def get_state(self) -> bytes:
        """The position: JSON bytes, the same on every process (see :func:`make_train_iterator`)."""
        state = {"format": _TRAIN_STATE_FORMAT, "next_batch": self._next_batch}
        state.update({key: getattr(self, key) for key in _TRAIN_STATE_KEYS})
        # indent=4 like grain's states, which the checkpoint code stores and re-encodes so.
        return json.dumps(state, indent=4).encode()

    def set_state(self, state: bytes | str | Mapping[str, Any]) -> None:
        """Continues from a position saved by ``get_state``, by any number of processes.

        Args:
          state: what ``get_state`` returned (JSON ``bytes``), the JSON text, or the decoded
            dict.

        Raises:
          ValueError: ``state`` is not a state of this iterator type, or it was saved for a
            different ``num_records``, ``seed``, ``global_batch_size`` or ``shuffle`` (the
            message names each difference, e.g. ``num_records=7 in the saved state,
            num_records=8 here``).
        """
        where = "TrainIterator.set_state"
        if isinstance(state, bytes | bytearray | str):
            try:
                state = json.loads(state)
            except ValueError as e:
                raise ValueError(f"{where}: the state is not JSON: {e}") from e
        if not isinstance(state, Mapping) or state.get("format") != _TRAIN_STATE_FORMAT:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"{where}: not a state saved by make_train_iterator (format "
                f"{_TRAIN_STATE_FORMAT!r}); got {keys}"
            )
        missing = [key for key in ("next_batch", *_TRAIN_STATE_KEYS) if key not in state]
        if missing:
            raise ValueError(f"{where}: the state lacks {missing}")
        differences = [
            f"{key}={state[key]!r} in the saved state, {key}={getattr(self, key)!r} here"
            for key in _TRAIN_STATE_KEYS
            if type(state[key]) is not type(getattr(self, key)) or state[key] != getattr(self, key)
        ]
        if differences:
            raise ValueError(
                f"{where}: the state was saved for a different input stream: "
                + "; ".join(differences)
            )
        next_batch = state["next_batch"]
        if not isinstance(next_batch, int) or isinstance(next_batch, bool) or next_batch < 0:
            raise ValueError(f"{where}: next_batch must be an integer >= 0, got {next_batch!r}")
        self.close()
        self._next_batch = next_batch

    def __repr__(self) -> str:
        return (
            f"TrainIterator(num_records={self.num_records}, seed={self.seed}, "
            f"shuffle={self.shuffle}, global_batch_size={self.global_batch_size}, "
            f"process_index={self.process_index}, process_count={self.process_count}, "
            f"next_batch_index={self._next_batch})"
        )


def make_train_iterator(
    source: ImageSource,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> TrainIterator:
    """A shuffled stream of training batches, the same global batches on any number of hosts.

    **Order.** With ``N = len(source)`` and ``B = global_batch_size``, epoch ``e`` visits
    the records in the order ``numpy.random.default_rng([seed, e]).permutation(N)`` (the
    identity when ``shuffle`` is False). The *stream* is the concatenation of the epochs
    ``0, 1, 2, ...``, and global batch ``k`` is stream positions ``k*B .. k*B+B-1``: batches
    run across epoch boundaries, are never short, and no record is dropped or repeated
    within an epoch. Process ``p`` of ``n`` yields, for each ``k = 0, 1, ...``, positions
    ``k*B + p*b .. k*B + (p+1)*b - 1`` with ``b = B // n``, and reads only those records.
    Concatenating batch ``k`` of processes ``0..n-1`` (in that order) gives global batch
    ``k`` exactly, whatever ``n``, ``worker_count`` and ``read_options`` are: a run on 2
    processes of 2 devices trains on the same data as one on 1 process of 4 devices.

    **Position.** ``state = it.get_state()`` is JSON bytes such as ``{"format": ...,
    "next_batch": k, "num_records": N, "seed": seed, "global_batch_size": B, "shuffle":
    true}``, with no trace of the process index or count, so it is identical on every
    process. ``it.set_state(state)`` on a fresh iterator made with the same source, seed,
    batch size and ``shuffle`` continues with global batch ``k``, also when it has a
    different ``process_count`` (a checkpoint of 2 processes resumes on 1 or 4). It raises
    ValueError naming the fields that differ from the saved ones.

    Args:
      source: random-access source of ``{"image": uint8 [H, W, C], "label": int32 []}``
        records; :class:`ArraySource` batches are gathered with one indexing per batch.
      global_batch_size: ``B``, examples per step over all processes; must be divisible by
        ``process_count``.
      seed: shuffle seed, an integer in ``[0, 2**32)``. Use the same seed on every process.
      process_index: this process's index; default ``jax.process_index()``.
      process_count: number of processes; default ``jax.process_count()``.
      shuffle: shuffle each epoch (True for training).
      num_epochs: None for an endless stream; otherwise the stream ends after
        ``num_epochs * N // B`` global batches: the last ``num_epochs * N % B`` stream
        positions, too few for a whole global batch, are dropped.
      worker_count: grain worker processes (``mp_prefetch``), each preparing whole batches;
        0 reads in this process, with threads. With grain 0.2.18 and jax imported, workers
        need absl flags to be parsed (``absl.app.run`` does it; grain issue #1355).
      worker_buffer_size: batches each worker prepares ahead.
      read_options: grain reading threads and prefetch buffer; the buffer counts *batches*
        (each read by one thread). None: 16 threads and 32 batches, or no threads for an
        :class:`ArraySource` (a gather is cheaper than handing it to a thread).

    Returns:
      A :class:`TrainIterator` yielding ``{"image": uint8 [b, H, W, C], "label": int32
      [b]}`` (the source's keys and dtypes, stacked) with ``b = global_batch_size //
      process_count``.

    Raises:
      ValueError: non-positive or non-divisible batch size (naming both numbers), a bad
        process index or count, a bad seed or num_epochs, or a source with fewer records
        than processes.
    """
    where = "make_train_iterator"
    process_index, process_count = _process_index_and_count(process_index, process_count, where)
    _per_process_batch_size(global_batch_size, process_count, where)
    if not isinstance(seed, int | np.integer) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"{where}: seed must be an integer in [0, 2**32), got {seed!r}")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"{where}: num_epochs must be positive or None, got {num_epochs}")
    if worker_count < 0:
        raise ValueError(f"{where}: worker_count must be >= 0, got {worker_count}")
    num_records = len(source)
    if num_records < process_count:
        raise ValueError(
            f"{where}: {source!r} has {num_records} records, fewer than "
            f"process_count={process_count}"
        )
    global_batch_size = int(global_batch_size)
    num_batches = None
    if num_epochs is not None:
        num_batches = int(num_epochs) * num_records // global_batch_size
    if read_options is None:
        if isinstance(source, ArraySource):
            read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        else:
            read_options = grain.ReadOptions(num_threads=16, prefetch_buffer_size=32)
    return TrainIterator(
        source,
        global_batch_size=global_batch_size,
        seed=int(seed),
        process_index=process_index,
        process_count=process_count,
        shuffle=bool(shuffle),
        num_batches=num_batches,
        worker_count=int(worker_count),
        worker_buffer_size=int(worker_buffer_size),
        read_options=read_options,
    )


def num_eval_batches(num_records: int, *, global_batch_size: int, process_count: int = 1) -> int:
    """Batches each process yields in one pass of :func:`make_eval_iterator`.

    Args:
      num_records: ``len(source)``.
      global_batch_size: as given to :func:`make_eval_iterator`.
      process_count: number of processes (checked to divide the batch; the count does not
        depend on it).

    Returns:
      ``ceil(num_records / global_batch_size)``, the same on every process.
    """
    _per_process_batch_size(global_batch_size, process_count, "num_eval_batches")
    return math.ceil(num_records / global_batch_size)


class _EvalBatchReader:
    """Maps a batch index ``k`` to this process's slice of global eval batch ``k`` with a
    ``mask``: records ``k * B + offset + j`` for ``j < b``, padding past the last record."""

    def __init__(self, source: ImageSource, global_batch_size: int, offset: int,
                 batch_size: int, image_shape: tuple[int, ...]):  # fmt: skip
        self._source, self._global_b, self._offset = source, global_batch_size, offset
        self._b, self._image_shape = batch_size, image_shape

    def __call__(self, k: int) -> Record:
        indices = int(k) * self._global_b + self._offset + np.arange(self._b, dtype=np.int64)
        mask = indices < len(self._source)
        batch = {
            "image": np.zeros((self._b, *self._image_shape), np.uint8),
            "label": np.zeros((self._b,), np.int32),
            "mask": mask,
        }
        if mask.any():
            records = _read_records(self._source, indices[mask])
            batch["image"][mask] = records["image"]
            batch["label"][mask] = records["label"]
        return batch


def make_eval_iterator(
    source: ImageSource,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> Iterator[Record]:
    """One exact pass over a split: every example exactly once over all processes.

    Global batch ``k`` holds records ``k * B .. k * B + B - 1`` in order (``B`` the global
    batch size); process ``i`` of ``n`` reads rows ``i * b .. (i + 1) * b - 1`` of it
    (``b = B // n``), so the global batches do not depend on the number of processes. Every
    process yields the same number of batches, :func:`num_eval_batches`, so that a
    multi-host step runs in lockstep: places past the last record are padding (zero image,
    label 0) with ``mask`` False. Sum a per-example metric as ``sum(metric * mask)`` and
    divide by ``len(source)``.

    Args:
      source: random-access source of ``{"image": uint8 [H, W, C], "label": int32 []}``
        records (at least one).
      global_batch_size: examples per step over all processes; must be divisible by
        ``process_count``.
      process_index: this process's index; default ``jax.process_index()``.
      process_count: number of processes; default ``jax.process_count()``.
      read_options: grain thread/prefetch options; None for grain's defaults.

    Returns:
      An iterator of ``{"image": uint8 [b, H, W, C], "label": int32 [b], "mask": bool [b]}``
      with ``b = global_batch_size // process_count``; ``mask`` is True for real examples.
      Call again for another pass.

    Raises:
      ValueError: non-positive or non-divisible batch size, a bad process index or count,
        or an empty source.
    """
    where = "make_eval_iterator"
    process_index, process_count = _process_index_and_count(process_index, process_count, where)
    batch_size = _per_process_batch_size(global_batch_size, process_count, where)
    num_records = len(source)
    if num_records <= 0:
        raise ValueError(f"{where}: {source!r} has no records")
    num_batches = num_eval_batches(
        num_records, global_batch_size=global_batch_size, process_count=process_count
    )
    reader = _EvalBatchReader(
        source, global_batch_size, process_index * batch_size, batch_size,
        np.shape(source[0]["image"]),
    )  # fmt: skip
    ds = grain.MapDataset.range(num_batches).map(reader)
    return iter(ds.to_iter_dataset(read_options or grain.ReadOptions()))
