"""Resumable passes over batches: per-batch results kept in the workdir as they finish.

A long evaluation (an ODE likelihood over a test split, 50,000 samples for a Frechet
distance) is cut into numbered batches whose results depend only on the settings and the
batch's index (every example or image draws its random numbers from its own index, see
:func:`vdm_jax.models.likelihood.example_keys`). :class:`BatchStore` keeps one ``.npz`` per
finished batch in a folder named after the settings (their hash), written atomically, so a
pass killed at any moment and started again with the same settings computes only the
missing batches and ends with the same arrays, bitwise on the same machine; other settings
get another folder and never mix. :func:`run_batches` runs such a pass with a progress line.

Files of a store (``FOLDER`` is e.g. ``WORKDIR/eval/test_ode_iw_K4_step00010000_<hash>``)::

    FOLDER/settings.json      {"identity": what the results depend on, "recorded": the rest}
    FOLDER/batch_000000.npz   batch 0's arrays, and so on
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from vdm_jax.errors import UserError
from vdm_jax.training import run_files

__all__ = [
    "BatchStore",
    "Progress",
    "npz_bytes",
    "run_batches",
    "settings_hash",
    "store_stem",
]

_BATCH_FILE = re.compile(r"^batch_(\d{6})\.npz$")


def settings_hash(identity: Mapping[str, Any]) -> str:
    """The first 10 hex digits of the SHA-256 of ``identity`` as sorted JSON."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def store_stem(name: str, identity: Mapping[str, Any]) -> str:
    """``<name>_<hash>``: ``name`` (characters other than letters, digits, ``_.-`` as ``_``)
    and :func:`settings_hash` of ``identity``."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}_{settings_hash(identity)}"


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an uncompressed ``.npz`` (what ``np.load`` reads)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buffer.getvalue()


class BatchStore:
    """The per-batch results of one pass with one set of settings, in a folder of their own.

    Only process 0 writes; every process reads what is there when the store is opened.

    Args:
      parent, name: the folder is ``parent/<stem><suffix>``, ``stem`` the
        :func:`store_stem` of ``name`` and ``identity``.
      identity: JSON-able settings the results depend on (estimator, draws, batch size,
        checkpoint step, model fields, ...): another identity is another folder.
      recorded: JSON-able settings written beside them but not compared (devices, versions).
      recompute: remove the folder's results first, so that everything is computed anew.
      suffix: appended to the folder's name.

    Attributes:
      stem: ``<name>_<hash>``; folder: the folder; resumed: the batches found at the start.
    """

    def __init__(
        self,
        parent: str,
        name: str,
        identity: Mapping[str, Any],
        recorded: Mapping[str, Any] | None = None,
        *,
        recompute: bool = False,
        suffix: str = "",
    ):
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self.stem = store_stem(name, self.identity)
        self.folder = os.path.join(parent, self.stem + suffix)
        self._writer = jax.process_index() == 0
        path = epath.Path(self.folder)
        settings = path / "settings.json"
        if settings.exists():
            saved = json.loads(settings.read_text()).get("identity")
            if saved != self.identity:
                raise UserError(
                    f"{settings} holds other settings than this pass's (the folder name's hash "
                    "is that of its settings); move the folder away, or set the recompute field"
                )
        if recompute and path.exists() and self._writer:
            logging.info("recomputing: removing the earlier results in %s", self.folder)
            path.rmtree()
        self.resumed = sorted(self._listing()) if path.exists() else []
        if self._writer:
            path.mkdir(parents=True, exist_ok=True)
            body = {"identity": self.identity, "recorded": dict(recorded or {})}
            run_files.write_atomically(
                str(settings), json.dumps(body, indent=2, sort_keys=True, default=str)
            )

    def _listing(self) -> list[int]:
        names = (p.name for p in epath.Path(self.folder).iterdir())
        return [int(m.group(1)) for m in map(_BATCH_FILE.match, names) if m]

    def path(self, index: int) -> str:
        """The file of batch ``index``."""
        return os.path.join(self.folder, f"batch_{index:06d}.npz")

    def load(self, index: int) -> dict[str, np.ndarray] | None:
        """Batch ``index``'s arrays, or None when it is not there or cannot be read (then it
        is computed again; a warning says so)."""
        path = epath.Path(self.path(index))
        if not path.exists():
            return None
        try:
            with np.load(io.BytesIO(path.read_bytes())) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            logging.warning("cannot read %s (%s); computing that batch again", path, e)
            return None

    def save(self, index: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write batch ``index``'s arrays (on process 0), atomically."""
        if self._writer:
            run_files.write_bytes_atomically(self.path(index), npz_bytes(arrays))

    def remove(self) -> None:
        """Delete the folder (on process 0), e.g. once its batches are gathered elsewhere."""
        if self._writer and epath.Path(self.folder).exists():
            epath.Path(self.folder).rmtree()


class Progress:
    """One log line per finished batch (at most one every ``every`` seconds, and the last):
    batches and items done, seconds per batch and the time left (ETA), measured from the end
    of the first batch computed in this process, so compilation is not counted."""

    def __init__(self, what: str, num_batches: int, num_items: int, unit: str, every=10.0):
        self.what, self.num_batches, self.num_items, self.unit = what, num_batches, num_items, unit
        self.every = every
        self._start: tuple[int, float] | None = None
        self._last = 0.0

    def update(self, done: int, items_done: int) -> None:
        """``done`` batches of ``num_batches`` (``items_done`` items) are finished."""
        now = time.time()
        if self._start is None:
            self._start = (done, now)
            self._last = now
            speed = ""
        else:
            rate = (now - self._start[1]) / max(done - self._start[0], 1)
            left = run_files.format_seconds(rate * (self.num_batches - done))
            speed = f"  {rate:.2f} s/batch  ETA {left}"
            if now - self._last < self.every and done < self.num_batches:
                return
            self._last = now
        logging.info("%s: batch %d/%d (%d of %d %s)%s", self.what, done, self.num_batches,
                     min(items_done, self.num_items), self.num_items, self.unit, speed)  # fmt: skip


def run_batches(
    store: BatchStore,
    batches: Any,
    compute: Callable[[int, Any], dict[str, np.ndarray]],
    progress: Progress,
    *,
    batch_items: int,
    stop_after: int | None = None,
) -> dict[int, dict[str, np.ndarray]] | None:
    """Every batch's arrays, read from ``store`` or computed and saved, in index order.

    Args:
      store: where finished batches are kept.
      batches: an iterable of the inputs of batches 0, 1, ... (at least
        ``progress.num_batches`` of them); those of batches already in the store are skipped.
      compute: ``compute(index, input)`` -> the batch's numpy arrays (the same on every
        process).
      progress: the progress line.
      batch_items: items (examples, images) per batch, for the progress line.
      stop_after: compute at most this many batches and return None if some are still
        missing, as if the process had been stopped there (a later call continues).

    Returns:
      ``{index: arrays}`` of every batch, or None (stopped early).
    """
    results: dict[int, dict[str, np.ndarray]] = {}
    computed = 0
    for index, inputs in enumerate(batches):
        if index >= progress.num_batches:
            break
        arrays = store.load(index) if index in store.resumed else None
        if arrays is None:
            if stop_after is not None and computed >= stop_after:
                return None
            arrays = compute(index, inputs)
            store.save(index, arrays)
            computed += 1
            progress.update(len(results) + 1, (len(results) + 1) * batch_items)
        results[index] = arrays
    if len(results) != progress.num_batches:
        raise AssertionError(f"{len(results)} batches for {progress.num_batches}")
    return results
