"""Files of a run's workdir: the folder checks, atomic writes, the metric writer and PNG grids.

A workdir is a local folder or a bucket URL (``gs://bucket/run``, through etils.epath).
Layout::

    workdir/config.json      the config the run was trained with
    workdir/data_info.json   the data's image shape, vocabulary and classes (what a model
                             needs without the data: vdm_jax.load_run reads it)
    workdir/checkpoints/     orbax checkpoints
    workdir/metrics.jsonl    one JSON object per logged step or evaluation
    workdir/tensorboard/     the same metrics as TensorBoard event files
    workdir/samples/         PNG grids of samples
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Any, TextIO

import jax
import numpy as np
from etils import epath

from vdm_jax.errors import UserError

__all__ = [
    "DATA_INFO",
    "MetricWriter",
    "check_no_run",
    "format_seconds",
    "is_remote",
    "prepare",
    "read_config",
    "read_data_info",
    "resolve",
    "save_image_grid",
    "write_atomically",
    "write_bytes_atomically",
    "write_run_config",
]


def is_remote(path: str | os.PathLike) -> bool:
    """A URL such as ``gs://bucket/run`` (a cloud bucket every host of a pod can reach)."""
    return "://" in os.fspath(path)


def resolve(workdir: str | os.PathLike) -> str:
    """The absolute workdir; creates nothing.

    Raises:
      UserError: an empty path, or the path (or the nearest existing folder above it) is a
        file.
    """
    if not isinstance(workdir, str | os.PathLike) or not os.fspath(workdir):
        raise UserError(f"workdir must be a folder path, got {workdir!r}")
    if is_remote(workdir):  # e.g. gs://bucket/run: checked when prepared
        return os.fspath(workdir)
    workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} exists and is not a folder")
    parent = workdir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot create workdir {workdir}: {parent} is a file, not a folder")
    return workdir


def check_no_run(workdir: str) -> None:
    """Refuse a workdir that already holds a run (a ``config.json`` or ``checkpoints/``).

    Raises:
      UserError: naming the workdir and the file found.
    """
    path = epath.Path(resolve(workdir))
    for name in ("config.json", "checkpoints"):
        if (path / name).exists():
            raise UserError(
                f"workdir {path} already holds a run ({name} exists); use a new folder "
                "(nothing was written)"
            )


def prepare(workdir: str) -> str:
    """Creates ``workdir`` if needed and proves it writable by creating (and removing) a file:
    ``os.access`` is not enough for root or read-only file systems. Returns ``workdir``."""
    if is_remote(workdir):
        probe = epath.Path(workdir) / f".write-probe-{os.getpid()}-{jax.process_index()}"
        try:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except Exception as e:
            raise UserError(f"workdir {workdir} is not writable: {e}") from None
        return workdir
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create workdir {workdir}: {e.strerror}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UserError(f"workdir {workdir} is not writable: {e.strerror}") from None
    return workdir


def read_config(workdir: str) -> dict:
    """The config a run was trained with, ``workdir/config.json``, as a nested dict.

    Raises:
      UserError: the workdir holds no ``config.json`` (it is not a training run's), or the
        file is not a JSON object.
    """
    path = epath.Path(resolve(workdir)) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        what = "holds no config.json" if path.parent.exists() else "does not exist"
        raise UserError(
            f"workdir {path.parent} {what}: train first (it is not a training run's workdir)"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a run's config (JSON): {e}") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a run's config: a JSON object, got {type(saved).__name__}")
    return saved


#: Beside ``config.json``: the :class:`~vdm_jax.training.sources.DatasetInfo` of the run's data.
DATA_INFO = "data_info.json"


def write_run_config(workdir: str, config: Any, info: Any) -> None:
    """``workdir/config.json`` (the config) and ``workdir/data_info.json`` (``info``, a
    :class:`~vdm_jax.training.sources.DatasetInfo`); process 0 writes, the others do nothing."""
    if jax.process_index() != 0:
        return
    write_atomically(os.path.join(workdir, "config.json"), config.to_json(indent=2))
    write_atomically(os.path.join(workdir, DATA_INFO), json.dumps(dataclasses.asdict(info)))


def read_data_info(workdir: str) -> dict | None:
    """``workdir/data_info.json`` as a dict (name, image_shape, vocab_size, num_classes), or
    None for a run written before that file existed."""
    path = epath.Path(resolve(workdir)) / DATA_INFO
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a run's data info (JSON): {e}") from None


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) so that a crash leaves the old or the new file,
    whole."""
    write_bytes_atomically(path, text.encode())


def write_bytes_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, whole."""
    if is_remote(path):  # an object store replaces an object whole
        epath.Path(path).write_bytes(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricWriter:
    """metrics.jsonl and TensorBoard event files in ``workdir``; writes on process 0 only.

    Each line of metrics.jsonl is one JSON object: ``step`` (the optimizer updates done) and
    float metrics (see the README for the keys). A context manager.
    """

    def __init__(self, workdir: str):
        self._jsonl: _RemoteAppend | TextIO | None = None
        self._tb: Any = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # imported lazily: slow import

            path = os.path.join(workdir, "metrics.jsonl")
            if is_remote(path):
                self._jsonl = _RemoteAppend(path)
            else:
                local = open(path, "a")
                # A run killed while writing leaves a partial last line: start on a fresh one.
                if local.tell() > 0:
                    with open(path, "rb") as f:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            local.write("\n")
                self._jsonl = local
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Append one record at ``step``."""
        jsonl, tb = self._jsonl, self._tb
        if jsonl is None or tb is None:  # not process 0
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        jsonl.write(json.dumps(record) + "\n")
        jsonl.flush()
        for k, v in record.items():
            if k != "step" and math.isfinite(v):
                tb.add_scalar(k, v, step)
        tb.flush()

    def close(self) -> None:
        """Flush and close the files."""
        if self._jsonl is not None and self._tb is not None:
            self._jsonl.close()
            self._tb.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _RemoteAppend:
    """Appending to an object in a bucket, which cannot be appended to: each flush rewrites
    it whole (metrics files stay small)."""

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._text = self._path.read_text() if self._path.exists() else ""
        if self._text and not self._text.endswith("\n"):
            self._text += "\n"

    def write(self, text: str) -> None:
        self._text += text

    def flush(self) -> None:
        self._path.write_text(self._text)

    def close(self) -> None:
        self.flush()


def save_image_grid(images: np.ndarray, path: str, vocab_size: int, scale: int = 4) -> str:
    """Write integer images ``[N, H, W, C]`` (values 0..V-1, C = 1 or 3) as one PNG grid.

    Values are rescaled to 0..255, the grid is as square as possible, each pixel is enlarged
    ``scale`` times (8x8 digits are otherwise too small to see). Returns ``path``.
    """
    from PIL import Image

    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pixels = np.round(images.astype(np.float64) * 255.0 / (vocab_size - 1)).astype(np.uint8)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = 1 + r * (h + 1), 1 + q * (w + 1)
        grid[top : top + h, left : left + w] = pixels[i]
    grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with epath.Path(path).open("wb") as f:
        Image.fromarray(grid[..., 0] if c == 1 else grid).save(f, format="PNG")
    return path


def format_seconds(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
