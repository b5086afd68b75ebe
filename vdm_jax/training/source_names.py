"""The names of data sets: the built-in ones (and what tfds reads for each) and those added
with :func:`register_source`. :func:`vdm_jax.training.sources.make_source` and
:func:`~vdm_jax.training.sources.dataset_info` dispatch on them, and the config schema's
``data.name`` accepts :func:`dataset_names` as they are when a config is checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from vdm_jax.errors import UserError

__all__ = [
    "KNOWN_DATASETS",
    "TFDS_DATASETS",
    "TFDS_SPECS",
    "TfdsSpec",
    "dataset_names",
    "register_source",
    "registered_source",
    "unregister_source",
]


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """What a short tfds name reads.

    Attributes:
      tfds_name: the tfds builder.
      image_shape: ``(H, W, C)``.
      num_classes: classes of the labels; 1 when the data has no label (the label is then 0).
      test_split: the tfds split read as ``"test"``.
    """

    tfds_name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    # The downsampled ImageNet builders have no "test" split: their "validation" is the test set.
    test_split: str = "test"


#: The built-in tfds data sets by short name.
TFDS_SPECS: Mapping[str, TfdsSpec] = {
    "cifar10": TfdsSpec("cifar10", (32, 32, 3), 10),
    "mnist": TfdsSpec("mnist", (28, 28, 1), 10),
    "imagenet32": TfdsSpec("downsampled_imagenet/32x32", (32, 32, 3), 1, "validation"),
    "imagenet64": TfdsSpec("downsampled_imagenet/64x64", (64, 64, 3), 1, "validation"),
}
#: Short names accepted by :func:`~vdm_jax.training.sources.tfds_source`, and the tfds
#: builders they read.
TFDS_DATASETS: Mapping[str, str] = {name: spec.tfds_name for name, spec in TFDS_SPECS.items()}

#: The built-in names (see :func:`dataset_names` for every name, registered ones included).
KNOWN_DATASETS = ("digits", *TFDS_DATASETS, "folder")

# name -> (make_fn, info_fn), in registration order.
_REGISTERED: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def dataset_names() -> tuple[str, ...]:
    """Every name ``make_source`` and ``dataset_info`` accept now: the built-in ones, then
    those registered, in registration order."""
    return (*KNOWN_DATASETS, *_REGISTERED)


def register_source(
    name: str, make_source_fn: Callable[..., Any], info_fn: Callable[..., Any]
) -> None:
    """Adds a data set under ``name``: ``make_source(name, ...)``, ``dataset_info(name, ...)``
    and a config's ``data.name`` accept it.

    Args:
      name: a new name (not one of :func:`dataset_names`).
      make_source_fn: called ``make_source_fn(split, data_dir=data_dir)`` with split
        ``"train"`` or ``"test"`` and ``data_dir`` the config's ``data.data_dir`` (None when
        unset); returns an image source (records ``{"image": uint8 [H, W, C], "label": int32
        []}``, ``len``, and ``info``, see :class:`~vdm_jax.training.sources.ImageSource`).
      info_fn: called ``info_fn(data_dir=data_dir)``; returns the
        :class:`~vdm_jax.training.sources.DatasetInfo` of the data set without reading it
        (what the model is built from).

    Raises:
      UserError: the name is taken, or a function is not callable.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"register_source: the name must be a non-empty string, got {name!r}")
    if name in dataset_names():
        raise UserError(f"register_source: the data set {name!r} is already registered")
    for what, fn in (("make_source_fn", make_source_fn), ("info_fn", info_fn)):
        if not callable(fn):
            raise UserError(f"register_source: {what} of {name!r} is not callable: {fn!r}")
    _REGISTERED[name] = (make_source_fn, info_fn)


def unregister_source(name: str) -> None:
    """Removes a data set added by :func:`register_source`.

    Raises:
      UserError: ``name`` was not registered (the built-in names cannot be removed).
    """
    if name not in _REGISTERED:
        raise UserError(f"unregister_source: {name!r} is not a registered data set")
    del _REGISTERED[name]


def registered_source(name: str) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """``(make_source_fn, info_fn)`` of a registered name; None for any other name."""
    return _REGISTERED.get(name)
