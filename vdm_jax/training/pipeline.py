"""The input pipeline: grain iterators over an image source (:mod:`vdm_jax.training.sources`).

Every function takes plain arguments (no config). The iterators are grain ``MapDataset``
pipelines over record indices. :func:`make_train_iterator` gives an endless stream of fixed-size
global batches (grain's seeded shuffle, repeat and batch) of which each process reads its slice,
so any number of processes trains on the same data; its position (``get_state`` / ``set_state``,
a small JSON-serialisable dict) does not depend on the number of processes either.
:func:`make_eval_iterator` gives one exact pass over a split: every example once, the last batch
padded and marked by a boolean ``"mask"``, the same number of batches on every process.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from vdm_jax.errors import UserError
from vdm_jax.training.sources import ArraySource, ImageSource, Record

__all__ = [
    "TrainIterator",
    "dispatch_batch",
    "make_eval_iterator",
    "make_train_iterator",
    "num_eval_batches",
]


# grain's MapDataset does the order (seeded shuffle, repeat, batch, per-process slice).

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
        records; :class:`~vdm_jax.training.sources.ArraySource` batches are gathered with one
        indexing per batch.
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
        an :class:`~vdm_jax.training.sources.ArraySource`.

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
    reader: Callable[[ImageSource, Any], Record] = _read_records
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
    batch: Record = {
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


def dispatch_batch(batches: Sequence[Record], use_labels: bool) -> Record:
    """The host batch one dispatch of the train step takes, from the iterator's next batches.

    Args:
      batches: the ``k`` next batches (``training.steps_per_dispatch``), each a dict of
        ``[B, ...]`` arrays: ``image`` uint8 ``[B, H, W, C]``, ``label`` int32 ``[B]`` and any
        other field (e.g. ``conditioning``, the augmentation flag, float32 ``[B]``).
      use_labels: whether the model is class-conditional; if not, ``label`` is dropped and
        every other field kept.

    Returns:
      ``batches[0]`` when ``k`` is 1, else the fields stacked to ``[k, B, ...]``.
    """
    if not use_labels:
        batches = [{n: v for n, v in b.items() if n != "label"} for b in batches]
    if len(batches) == 1:
        return batches[0]
    return {n: np.stack([b[n] for b in batches]) for n in batches[0]}
