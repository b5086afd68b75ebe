"""Image sources: the data sets the input pipeline reads (:mod:`vdm_jax.training.pipeline`).

Every function takes plain arguments (no config). A *source* is a random-access sequence of
records ``{"image": uint8 [H, W, C], "label": int32 []}`` with pixel values the data's own
integers in ``0..vocab_size-1`` (never rescaled; grey images keep ``C = 1``), an
``info: DatasetInfo`` and a ``repr`` free of machine-specific paths:

* :func:`digits_source`: the 8x8 digits bundled with scikit-learn (offline default);
* :func:`tfds_source`: cifar10, mnist, imagenet32, imagenet64 through ``tfds.data_source``
  (TensorFlow is needed only once, to prepare the data set in the ``array_record`` format);
* :func:`folder_source`: a folder ``root/{train,test}/<class>/*.png|jpg|jpeg``;
* :func:`array_source`: images and labels held in memory as numpy arrays;
* :func:`make_source`: any of the named ones by name (the entry point for configs), and those
  added with :func:`~vdm_jax.training.source_names.register_source`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from vdm_jax.errors import UserError
from vdm_jax.training import digits_file

# Re-exported (documented in vdm_jax.training.source_names).
from vdm_jax.training.source_names import KNOWN_DATASETS as KNOWN_DATASETS
from vdm_jax.training.source_names import TFDS_DATASETS as TFDS_DATASETS
from vdm_jax.training.source_names import TFDS_SPECS, dataset_names, registered_source
from vdm_jax.training.source_names import register_source as register_source
from vdm_jax.training.source_names import unregister_source as unregister_source

__all__ = [
    "DIGITS_NUM_TEST",
    "DIGITS_NUM_TRAIN",
    "DIGITS_VOCAB_SIZE",
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "DatasetInfo",
    "FolderSource",
    "ImageSource",
    "NamedSource",
    "Record",
    "TfdsSource",
    "array_source",
    "dataset_info",
    "digits_source",
    "folder_source",
    "make_source",
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


class NamedSource(ImageSource, Protocol):
    """An :class:`ImageSource` with ``info``, its :class:`DatasetInfo`: what
    :func:`make_source` returns."""

    @property
    def info(self) -> DatasetInfo: ...


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
        image_shape=(int(images.shape[1]), int(images.shape[2]), int(images.shape[3])),
        vocab_size=int(vocab_size),
        num_classes=int(num_classes),
    )
    return ArraySource(images, labels, info)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits_file.read_digits()
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
        self._spec = TFDS_SPECS[name]
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
    if name not in TFDS_SPECS:
        raise UserError(
            f"tfds_source: unknown data set {name!r}; known tfds data sets: {sorted(TFDS_SPECS)}"
        )
    if not isinstance(split, str) or not split:
        raise UserError(f"tfds_source: split must be a non-empty string, got {split!r}")
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        if "://" not in data_dir and not os.path.isdir(data_dir):
            raise UserError(f"tfds_source: data_dir {data_dir!r} does not exist")
    spec = TFDS_SPECS[name]
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

    size: tuple[int, int] | None = None
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
    width, height = size or (0, 0)  # set: files is not empty
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


def make_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> NamedSource:
    """Builds a named source: the entry point for configs.

    Args:
      name: one of :func:`~vdm_jax.training.source_names.dataset_names`: ``"digits"``,
        ``"cifar10"``, ``"mnist"``, ``"imagenet32"``, ``"imagenet64"``, ``"folder"``, or a
        registered name.
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
    if name in TFDS_SPECS:
        return tfds_source(name, split, data_dir=data_dir)
    if name == "folder":
        if data_dir is None:
            raise UserError("make_source: name 'folder' needs data_dir (the image folder)")
        return folder_source(data_dir, split)
    if (registered := registered_source(name)) is not None:
        return registered[0](split, data_dir=data_dir)
    raise UserError(f"make_source: unknown data set {name!r}; known: {list(dataset_names())}")


def dataset_info(name: str, *, data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` (image shape, vocabulary size, classes) of a named data set.

    Reads no data except for ``"folder"``, whose train split is scanned (file headers only).

    Args:
      name: one of :func:`~vdm_jax.training.source_names.dataset_names`.
      data_dir: the image folder for ``"folder"``, passed to a registered name's ``info_fn``;
        ignored otherwise.

    Returns:
      e.g. ``DatasetInfo("digits", (8, 8, 1), 17, 10)`` or
      ``DatasetInfo("cifar10", (32, 32, 3), 256, 10)``.

    Raises:
      UserError: unknown name (listing the known ones), or ``"folder"`` without a valid
        ``data_dir``.
    """
    if name == "digits":
        return DatasetInfo("digits", (8, 8, 1), DIGITS_VOCAB_SIZE, 10)
    if name in TFDS_SPECS:
        spec = TFDS_SPECS[name]
        return DatasetInfo(name, spec.image_shape, 256, spec.num_classes)
    if name == "folder":
        return make_source("folder", "train", data_dir=data_dir).info
    if (registered := registered_source(name)) is not None:
        return registered[1](data_dir=data_dir)
    raise UserError(f"dataset_info: unknown data set {name!r}; known: {list(dataset_names())}")
