"""Input pipelines: image sources and grain iterators for training and evaluation.

Every function takes plain arguments (no config). A *source* is a random-access sequence of
records ``{"image": uint8 [H, W, C], "label": int32 []}`` with pixel values the data's own
integers in ``0..vocab_size-1`` (never rescaled; grey images keep ``C = 1``), an
``info: DatasetInfo`` and a ``repr`` free of machine-specific paths:

* :func:`digits_source`: the 8x8 digits bundled with scikit-learn (offline default);
* :func:`tfds_source`: cifar10, mnist, imagenet32, imagenet64 through ``tfds.data_source``
  (TensorFlow is needed only once, to prepare the data set in the ``array_record`` format);
* :func:`folder_source`: a folder ``root/{train,test}/<class>/*.png|jpg|jpeg``;
* :func:`array_source`: images and labels held in memory as numpy arrays;
* :func:`make_source`: any of the named ones by name (the entry point for configs).

The iterators are grain ``MapDataset`` pipelines over record indices.
:func:`make_train_iterator` gives an endless stream of fixed-size global batches (grain's
seeded shuffle, repeat and batch) of which each process reads its slice, so any number of
processes trains on the same data; its position (``get_state`` / ``set_state``, a small
JSON-serialisable dict) does not depend on the number of processes either.
:func:`make_eval_iterator` gives one exact pass over a split: every example once, the last
batch padded and marked by a boolean ``"mask"``, the same number of batches on every process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from PIL import Image

from vdm_jax.errors import UserError

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
        raise UserError(f"{where}: split must be one of {_SPLITS}, got {split!r}")


def _check_index(index: int, source: ImageSource) -> int:
    index, n = int(index), len(source)
    if not -n <= index < n:
        raise IndexError(f"{source!r}: index {index} out of range for {n} records")
    return index % n


# ---------------------------------------------------------------------------------------------
# In-memory arrays (and the digits).


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class ArraySource:
    """Random-access source over in-memory numpy arrays; build it with :func:`array_source`.

    Attributes:
      images: uint8 array [N, H, W, C].
      labels: int32 array [N].
      info: the :class:`DatasetInfo`.
    """

    images: np.ndarray
    labels: np.ndarray
    info: DatasetInfo

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Record:
        index = _check_index(index, self)
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
      UserError: wrong dtype or rank, empty images, mismatched lengths, pixel values not
        below ``vocab_size``, negative labels or labels not below ``num_classes``.
    """
    if not 2 <= int(vocab_size) <= 256:
        raise UserError(f"array_source: vocab_size must be in 2..256, got {vocab_size}")
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise UserError(f"array_source: images must have dtype uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise UserError(
            f"array_source: images must be [N, H, W, C] or [N, H, W], got shape {images.shape}"
        )
    if images.shape[0] == 0:
        raise UserError(f"array_source: no images (shape {images.shape})")
    images = np.ascontiguousarray(images)
    if int(images.max()) >= vocab_size:
        raise UserError(
            f"array_source: pixel value {int(images.max())} is not below vocab_size={vocab_size}"
        )
    n = images.shape[0]
    if labels is None:
        labels = np.zeros((n,), np.int32)
    else:
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"array_source: labels must be integers, got dtype {labels.dtype}")
        if labels.ndim != 1:
            raise UserError(f"array_source: labels must be [N], got shape {labels.shape}")
        if labels.shape[0] != n:
            raise UserError(
                f"array_source: {n} images but {labels.shape[0]} labels; lengths must match"
            )
        if labels.min() < 0:
            raise UserError(f"array_source: labels must be >= 0, got {int(labels.min())}")
        if labels.max() > np.iinfo(np.int32).max:
            raise UserError(f"array_source: label {int(labels.max())} does not fit in int32")
        labels = labels.astype(np.int32)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif int(labels.max()) >= num_classes:
        raise UserError(
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
    num_classes: int  # 1: no label in the data (the label is 0)
    # The downsampled ImageNet builders have no "test" split: their "validation" is the test set.
    test_split: str = "test"


_TFDS_SPECS = {
    "cifar10": _TfdsSpec("cifar10", (32, 32, 3), 10),
    "mnist": _TfdsSpec("mnist", (28, 28, 1), 10),
    "imagenet32": _TfdsSpec("downsampled_imagenet/32x32", (32, 32, 3), 1, "validation"),
    "imagenet64": _TfdsSpec("downsampled_imagenet/64x64", (64, 64, 3), 1, "validation"),
}
#: Short names accepted by :func:`tfds_source`, and the tfds builders they read.
TFDS_DATASETS: Mapping[str, str] = {name: spec.tfds_name for name, spec in _TFDS_SPECS.items()}

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
        index = _check_index(index, self)
        example = self._data_source[index]
        image = np.asarray(example["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != self._spec.image_shape:
            raise UserError(
                f"{self!r}: record {index} has image shape {image.shape}, expected "
                f"{self._spec.image_shape}"
            )
        label = example["label"] if self._spec.num_classes > 1 else 0
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
      UserError: unknown name, missing ``data_dir``, or tfds cannot open the split.
    """
    if name not in _TFDS_SPECS:
        raise UserError(
            f"tfds_source: unknown data set {name!r}; known tfds data sets: {sorted(_TFDS_SPECS)}"
        )
    if not isinstance(split, str) or not split:
        raise UserError(f"tfds_source: split must be a non-empty string, got {split!r}")
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if "://" not in data_dir and not os.path.isdir(data_dir):
            raise UserError(f"tfds_source: data_dir {data_dir!r} does not exist")
    spec = _TFDS_SPECS[name]
    tfds_split = spec.test_split if split == "test" else split

    import tensorflow_datasets as tfds  # imported when first needed

    try:
        data_source = tfds.data_source(
            spec.tfds_name, split=tfds_split, data_dir=data_dir, download=download
        )
    except Exception as e:
        raise UserError(
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
        raise UserError(f"cannot read image file {path!r}: {type(e).__name__}: {e}") from e


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class FolderSource:
    """Source over image files; build it with :func:`folder_source`.

    Attributes:
      root: the folder holding the split folders.
      split: ``"train"`` or ``"test"``.
      classes: class names (sorted); ``label`` is the index in this tuple.
      files: the image paths, in order (by class, then by file name).
      labels: int32 array [N], the label of each file.
      info: the :class:`DatasetInfo`.
    """

    root: str
    split: str
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Record:
        index = _check_index(index, self)
        path = self.files[index]
        with _open_image(path) as im:
            try:
                mode = "L" if self.info.image_shape[2] == 1 else "RGB"
                image = np.asarray(im.convert(mode), dtype=np.uint8)
            except Exception as e:  # truncated or corrupt pixel data
                raise UserError(
                    f"cannot decode image file {path!r}: {type(e).__name__}: {e}"
                ) from e
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != self.info.image_shape:
            raise UserError(
                f"image file {path!r} decoded to shape {image.shape}, expected "
                f"{self.info.image_shape}"
            )
        return {"image": image, "label": self.labels[index]}

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
      UserError: missing ``root`` or split folder, no class folders or no image files,
        images of two sizes (naming both sizes and a file of each), an unreadable or corrupt
        file (naming it; a file whose header reads but whose pixels do not fails when read),
        or an image mode that is not 8-bit.
    """
    _check_split(split, "folder_source")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"folder_source: image folder {root!r} does not exist")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(f"folder_source: split folder {split_dir!r} does not exist")
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
        raise UserError(
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
            raise UserError(
                f"folder_source: image file {path!r} has mode {mode!r}; only 8-bit images "
                f"are supported (modes {sorted(_GREY_MODES | _COLOUR_MODES)})"
            )
        grey = grey and mode in _GREY_MODES
        if size is None:
            size, first_file = this_size, path
        elif this_size != size:
            raise UserError(
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
      UserError: unknown name (listing the known ones), or whatever the chosen source
        rejects.
    """
    if name == "digits":
        return digits_source(split)
    if name in _TFDS_SPECS:
        return tfds_source(name, split, data_dir=data_dir)
    if name == "folder":
        if data_dir is None:
            raise UserError("make_source: name 'folder' needs data_dir (the image folder)")
        return folder_source(data_dir, split)
    raise UserError(f"make_source: unknown data set {name!r}; known: {list(KNOWN_DATASETS)}")


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
      UserError: unknown name (listing the known ones), or ``"folder"`` without a valid
        ``data_dir``.
    """
    if name == "digits":
        return DatasetInfo("digits", (8, 8, 1), DIGITS_VOCAB_SIZE, 10)
    if name in _TFDS_SPECS:
        spec = _TFDS_SPECS[name]
        return DatasetInfo(name, spec.image_shape, 256, spec.num_classes)
    if name == "folder":
        return make_source("folder", "train", data_dir=data_dir).info
    raise UserError(f"dataset_info: unknown data set {name!r}; known: {list(KNOWN_DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Iterators: grain's MapDataset does the order (seeded shuffle, repeat, batch, per-process slice).

# Written into every saved position. Format 1 (numpy permutations per epoch) is another order.
_STATE_FORMAT = "vdm_jax.training.data/2"
# The fields a saved position is only valid for; checked by TrainIterator.set_state.
_STREAM_FIELDS = ("num_records", "seed", "global_batch_size", "shuffle", "augment")


def _process_index_and_count(
    process_index: int | None, process_count: int | None, where: str
) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if process_count <= 0:
        raise UserError(f"{where}: process_count must be positive, got {process_count}")
    if not 0 <= process_index < process_count:
        raise UserError(
            f"{where}: process_index must be in [0, {process_count}), got {process_index}"
        )
    return process_index, process_count


def _per_process_batch_size(global_batch_size: int, process_count: int, where: str) -> int:
    if global_batch_size <= 0:
        raise UserError(f"{where}: global_batch_size must be positive, got {global_batch_size}")
    if global_batch_size % process_count:
        raise UserError(
            f"{where}: global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}"
        )
    return global_batch_size // process_count


def _process_slices(
    positions: grain.MapDataset, batch_size: int, process_index: int, process_count: int
) -> grain.MapDataset:
    """This process's slice of each global batch of a stream (of record indices or draws).

    Global batch ``k`` is stream positions ``k*B .. k*B+B-1`` (``B = batch_size *
    process_count``); process ``p``'s slice is rows ``p*b .. p*b+b-1`` of it, which is batch
    ``k*n + p`` of the stream batched by ``b``. Element ``k`` of the result is that slice
    (the stream's elements stacked, [b]) for every process, so grain's position
    ``next_index`` is the global batch index whatever the process count. A last partial
    global batch is dropped.
    """
    batches = positions.batch(batch_size, drop_remainder=True)
    stop = len(batches) // process_count * process_count
    return batches[process_index:stop:process_count]


def _read_records(source: ImageSource, indices: np.ndarray) -> Record:
    """Reads records ``indices`` (int64 [b]) and stacks them into one batch."""
    if isinstance(source, ArraySource):
        # In memory: one gather instead of b dicts and a stack.
        return {"image": source.images[indices], "label": source.labels[indices]}
    records = [source[int(i)] for i in indices]
    return {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]}


def _draw_augmentation(record: int, rng: np.random.Generator) -> dict[str, Any]:
    """The authors' augmentation draws for one example (google-research/vdm, ``dataset.py``):
    a left-right flip with probability 1/2, then with probability 1/2 a rotation by ``k * 90``
    degrees, ``k`` uniform in 1..3. ``rng`` is grain's, seeded by the stream position."""
    flip = rng.random() < 0.5
    k = int(rng.integers(1, 4))
    return {"index": record, "flip": flip, "rotations": k if rng.random() < 0.5 else 0}


def _read_augmented(source: ImageSource, draws: Record) -> Record:
    """Records ``draws["index"]`` flipped and rotated as drawn, with ``"conditioning"``:
    float32 [b], 1 where any transform was applied (the flag the authors' network takes)."""
    batch = _read_records(source, draws["index"])
    images = batch["image"]
    images[draws["flip"]] = images[draws["flip"], :, ::-1]
    for k in (1, 2, 3):
        rotate = draws["rotations"] == k
        # Counter-clockwise, as tf.image.rot90 in the authors' code.
        images[rotate] = np.rot90(images[rotate], k, axes=(1, 2))
    batch["conditioning"] = (draws["flip"] | (draws["rotations"] > 0)).astype(np.float32)
    return batch


class TrainIterator:
    """The iterator :func:`make_train_iterator` returns (see there for the batch order).

    A thin layer over grain's checkpointable ``DatasetIterator``: ``get_state()`` adds to
    grain's position the fields it is valid for, and ``set_state`` checks them.

    Attributes:
      stream: what defines the stream, ``{"num_records": N, "seed": ..., "global_batch_size":
        B, "shuffle": ..., "augment": ...}``; a position is valid only for the same values.
      num_batches: global batches in the whole stream; None when endless.
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        read_options: grain.ReadOptions,
        stream: Mapping[str, Any],
        endless: bool,
    ):
        self.stream = {key: stream[key] for key in _STREAM_FIELDS}
        self.num_batches = None if endless else len(batches)
        self._iterator = iter(batches.to_iter_dataset(read_options))

    @property
    def next_batch_index(self) -> int:
        """Index ``k`` of the global batch the next ``next()`` returns a slice of."""
        return self._iterator.get_state()["next_index"]

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Record:
        position = self._iterator.get_state()
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except BaseException:
            # grain's prefetch buffer has moved past the failed batch: a retry reads it again.
            self._iterator.set_state(position)
            raise

    def close(self) -> None:
        """Stops grain's reading threads now rather than when the iterator is collected."""
        self._iterator.close()

    def get_state(self) -> dict[str, Any]:
        """The position: a JSON-serialisable dict, the same on every process.

        Returns:
          ``{"format": ..., "next_index": k, **stream}``: ``next_index`` is grain's
          position, the index of the next global batch; ``stream`` as the attribute.
        """
        return {"format": _STATE_FORMAT, **self._iterator.get_state(), **self.stream}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a position saved by ``get_state``, by any number of processes.

        Raises:
          UserError: ``state`` is not a state of this iterator type, or it was saved for a
            different ``format`` or ``stream`` field (the message names each, e.g.
            ``num_records=7 in the saved state, num_records=8 here``).
        """
        where = "TrainIterator.set_state"
        if not isinstance(state, Mapping) or "format" not in state:
            raise UserError(
                f"{where}: not a position saved by make_train_iterator (a dict with a 'format' "
                f"field); got {type(state).__name__} {str(state)[:80]}"
            )
        expected = {"format": _STATE_FORMAT, **self.stream}
        missing = [key for key in ("next_index", *expected) if key not in state]
        if missing:
            raise UserError(f"{where}: the saved position lacks {missing}")
        differences = [
            f"{key}={state[key]!r} in the saved state, {key}={value!r} here"
            for key, value in expected.items()
            if type(state[key]) is not type(value) or state[key] != value
        ]
        if differences:
            raise UserError(
                f"{where}: the position was saved for a different input stream: "
                + "; ".join(differences)
            )
        k = state["next_index"]
        if type(k) is not int or k < 0 or (self.num_batches is not None and k > self.num_batches):
            raise UserError(f"{where}: next_index must be an integer >= 0, got {k!r}")
        self._iterator.set_state({"next_index": k})

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in self.stream.items())
        return f"TrainIterator({fields}, next_batch_index={self.next_batch_index})"


def make_train_iterator(
    source: ImageSource,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    augment: bool = False,
    read_options: grain.ReadOptions | None = None,
) -> TrainIterator:
    """A shuffled stream of training batches, the same global batches on any number of hosts.

    **Order.** The *stream* of record indices is grain's
    ``grain.MapDataset.range(N).seed(seed).shuffle().repeat(num_epochs)`` (``N =
    len(source)``): each epoch is a permutation of ``0..N-1``, a different one each epoch.
    Global batch ``k`` is stream positions ``k*B .. k*B+B-1`` (``B = global_batch_size``):
    batches run across epoch boundaries and are never short. Process ``p`` of ``n`` yields,
    for each ``k``, rows ``p*b .. (p+1)*b-1`` of global batch ``k`` (``b = B // n``) and reads
    only those records. Concatenating batch ``k`` of processes ``0..n-1`` gives global batch
    ``k`` whatever ``n`` and ``read_options`` are: a run on 2 processes of 2 devices trains on
    the same data as one on 1 process of 4 devices.

    **Augmentation** (``augment=True``, as the paper's augmented CIFAR-10 model): each example
    is flipped left-right with probability 1/2, then rotated by 90, 180 or 270 degrees
    (counter-clockwise, equally likely) with probability 1/2; the batch gets ``"conditioning"``,
    float32 [b], 1 where a flip or a rotation was applied and 0 where the image is as stored.
    The draws are grain's ``random_map`` after the repeat, seeded from ``seed`` and the stream
    position, so they too do not depend on the process count, and a resumed run sees exactly
    the same images. The record order is the same as without augmentation.

    **Position.** ``it.get_state()`` is a JSON-serialisable dict (see
    :meth:`TrainIterator.get_state`) without the process index or count, so it is identical on
    every process. ``it.set_state(state)`` on an iterator made with the same source length,
    seed, batch size, ``shuffle`` and ``augment`` continues with global batch ``k``, also with
    a different ``process_count`` (a checkpoint of 2 processes resumes on 1 or 4).

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
        ``num_epochs * N // B`` global batches (the last partial global batch is dropped).
      augment: apply the random flips and rotations (square images only).
      read_options: grain's reading threads and prefetch buffer, counted in *batches* (each
        read by one thread). None: 16 threads and 32 batches, or 1 thread and 2 batches for
        an :class:`ArraySource`.

    Returns:
      A :class:`TrainIterator` yielding ``{"image": uint8 [b, H, W, C], "label": int32
      [b]}``, and ``"conditioning": float32 [b]`` with ``augment``.

    Raises:
      UserError: non-positive or non-divisible batch size (naming both numbers), a bad
        process index or count, a bad seed or num_epochs, a source with fewer records
        than processes, or ``augment`` with images that are not square.
    """
    where = "make_train_iterator"
    process_index, process_count = _process_index_and_count(process_index, process_count, where)
    batch_size = _per_process_batch_size(global_batch_size, process_count, where)
    if not isinstance(seed, int | np.integer) or not 0 <= int(seed) < 2**32:
        raise UserError(f"{where}: seed must be an integer in [0, 2**32), got {seed!r}")
    if num_epochs is not None and num_epochs <= 0:
        raise UserError(f"{where}: num_epochs must be positive or None, got {num_epochs}")
    num_records = len(source)
    if num_records < process_count:
        raise UserError(
            f"{where}: {source!r} has {num_records} records, fewer than "
            f"process_count={process_count}"
        )
    stream = grain.MapDataset.range(num_records).seed(int(seed))
    if shuffle:
        stream = stream.shuffle()
    stream = stream.repeat(num_epochs)
    reader = _read_records
    if augment:
        shape = np.shape(source[0]["image"])
        if shape[0] != shape[1]:
            raise UserError(
                f"{where}: augment=True rotates images by 90 degrees, so they must be square; "
                f"{source!r} has images of shape {shape}"
            )
        # Seeded from the pipeline seed and the stream position (the index after repeat).
        stream, reader = stream.random_map(_draw_augmentation), _read_augmented
    batches = _process_slices(stream, batch_size, process_index, process_count)
    if read_options is None:
        # One thread keeps in-memory gathers (and grain's index shuffle) ahead of the step;
        # files need many to decode in parallel.
        threads = 1 if isinstance(source, ArraySource) else 16
        read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    fields = {
        "num_records": num_records,
        "seed": int(seed),
        "global_batch_size": int(global_batch_size),
        "shuffle": bool(shuffle),
        "augment": bool(augment),
    }
    batches = batches.map(functools.partial(reader, source))
    return TrainIterator(batches, read_options, fields, endless=num_epochs is None)


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


def _read_padded(source: ImageSource, image_shape: tuple[int, ...], indices: np.ndarray) -> Record:
    """Records ``indices`` (int64 [b]); places past the source's end are zeros, mask False."""
    mask = indices < len(source)
    batch = {
        "image": np.zeros((len(indices), *image_shape), np.uint8),
        "label": np.zeros((len(indices),), np.int32),
        "mask": mask,
    }
    if mask.any():
        records = _read_records(source, indices[mask])
        batch["image"][mask] = records["image"]
        batch["label"][mask] = records["label"]
    return batch


def make_eval_iterator(
    source: ImageSource,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    with_conditioning: bool = False,
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
      with_conditioning: add ``"conditioning"``, float32 zeros [b]: the augmentation flag of
        unaugmented images, for a model trained with ``make_train_iterator(augment=True)``.
      read_options: grain thread/prefetch options; None for grain's defaults.

    Returns:
      An iterator of ``{"image": uint8 [b, H, W, C], "label": int32 [b], "mask": bool [b]}``
      (and ``"conditioning"`` if asked) with ``b = global_batch_size // process_count``;
      ``mask`` is True for real examples. Call again for another pass.

    Raises:
      UserError: non-positive or non-divisible batch size, a bad process index or count,
        or an empty source.
    """
    where = "make_eval_iterator"
    process_index, process_count = _process_index_and_count(process_index, process_count, where)
    batch_size = _per_process_batch_size(global_batch_size, process_count, where)
    if len(source) <= 0:
        raise UserError(f"{where}: {source!r} has no records")
    num_batches = num_eval_batches(
        len(source), global_batch_size=global_batch_size, process_count=process_count
    )
    positions = grain.MapDataset.range(num_batches * global_batch_size)
    batches = _process_slices(positions, batch_size, process_index, process_count)
    batches = batches.map(functools.partial(_read_padded, source, np.shape(source[0]["image"])))
    if with_conditioning:
        batches = batches.map(lambda b: b | {"conditioning": np.zeros(batch_size, np.float32)})
    return iter(batches.to_iter_dataset(read_options or grain.ReadOptions()))
