"""Experiments from a config: :func:`train_and_evaluate`, :func:`evaluate`, :func:`sample`,
:func:`report`.

This is the only module that reads a whole ml_collections config (see
``vdm_jax/configs/base.py`` for every field, and :data:`CONFIG_FIELDS` for what each may
hold). Output in ``workdir``:

- ``checkpoints/``: orbax checkpoints (state, data iterator, the config they were written with);
- ``metrics.jsonl``: one JSON object per logged step or evaluation;
- ``tensorboard/``: the same as TensorBoard event files;
- ``samples/``: PNG grids of samples.

Only process 0 writes metrics and images; every process takes part in checkpoints.

What a run guarantees (tests/test_reliability.py proves each point):

- **Bad input stops before anything is written.** :func:`check_config` checks every field (type,
  range, unknown or missing fields, relations such as ``gamma_min < gamma_max``); then both
  data splits are opened and compared, the model is traced, the devices and batch size are
  checked and the workdir is probed for writing. Each problem raises ``ValueError`` naming the
  field, file or folder; no checkpoint, metric or config file is created or changed.
- **Exact resume.** A run killed at any moment (SIGKILL, a crash) and restarted with the same
  command resumes from its latest complete checkpoint (state, optimizer and data position) and
  ends with bitwise the same parameters as an uninterrupted run (on the same machine).
- **Preemption.** SIGTERM makes the loop save a checkpoint at the next step and return
  normally; the next start resumes from it.
- **Damaged checkpoints.** A truncated or partly deleted latest checkpoint is skipped with a
  warning in favour of the previous good one (see :mod:`vdm_jax.training.checkpoint`).
- **Divergence.** A non-finite loss term, gradient norm or parameter stops training with
  :class:`TrainingDivergedError` naming the first bad step and the terms; the check runs on
  the device every step (no host round trip) and is read at each log, checkpoint, evaluation
  and sampling step, before anything is saved, so no checkpoint holds a diverged state.
  ``training.skip_nonfinite_updates = N`` instead skips such updates (the parameters,
  their EMA and the optimizer state stay as they were; the step and the data move on), up to
  N in a row, and reports the count as the metric ``skipped_updates``.
- **Failed checkpoint writes** (disk full) raise
  :class:`~vdm_jax.training.checkpoint.CheckpointSaveError`; earlier checkpoints stay intact.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vdm_jax import evaluation, sampling
from vdm_jax.model import SCHEDULES, VDM, make_schedule
from vdm_jax.nets import ATTENTION_KINDS, ScoreUNet
from vdm_jax.training import checkpoint, data, parallel, steps
from vdm_jax.training import report as report_io
from vdm_jax.training.preemption import PreemptionWatcher


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss term, gradient norm or parameter.

    The message names the first bad step and the terms; nothing after the last good
    checkpoint was saved.
    """


# Config fields a checkpoint must agree on to be resumed.
RESUME_KEYS = (
    "seed",
    "data.name",
    "training.batch_size",
    "optimizer.clip_norm",
    *(
        f"model.{k}"
        for k in (
            "n_layer", "n_embd", "attention_everywhere", "with_fourier_features",
            "fourier_exponents", "norm_groups", "num_classes", "schedule", "schedule_features",
        )
    ),
)  # fmt: skip


# --------------------------------------------------------------------------- config checks

_POSITIVE_INT = ("int", lambda v: v >= 1, "a positive integer")
_NON_NEGATIVE_INT = ("int", lambda v: v >= 0, "a non-negative integer")
_NON_NEGATIVE = ("float", lambda v: v >= 0, "a non-negative finite number")
_UNIT = ("float", lambda v: 0 <= v < 1, "a number in [0, 1)")
_NUMBER = ("float", lambda v: True, "a finite number")
_BOOL = ("bool", lambda v: True, "True or False")


def _choice(*options: str) -> tuple:
    return ("choice", lambda v: v in options, "one of " + ", ".join(map(repr, options)))


#: Every config field an experiment reads: dotted name -> (kind, check, what it must be).
#: Kinds: 'int' (not bool), 'float' (int or float, finite), 'bool', 'choice' (a string from a
#: list), 'str' (non-empty), 'path' (a non-empty string or None), 'ints' (a tuple or list of
#: integers).
CONFIG_FIELDS: dict[str, tuple] = {
    "seed": ("int", lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "data.name": _choice(*data.KNOWN_DATASETS),
    "data.data_dir": ("path", lambda v: True, "a path (a non-empty string) or None"),
    "data.augment": _BOOL,
    "model.n_layer": _POSITIVE_INT,
    "model.n_embd": _POSITIVE_INT,
    "model.dropout_rate": _UNIT,
    "model.attention_everywhere": _BOOL,
    "model.with_fourier_features": _BOOL,
    "model.fourier_exponents": ("ints", lambda v: True, "a tuple of integers"),
    "model.norm_groups": _POSITIVE_INT,
    "model.num_classes": _NON_NEGATIVE_INT,
    "model.dtype": _choice("float32", "bfloat16"),
    "model.schedule": _choice(*SCHEDULES),
    "model.gamma_min": _NUMBER,
    "model.gamma_max": _NUMBER,
    "model.schedule_features": _POSITIVE_INT,
    "model.num_steps": _NON_NEGATIVE_INT,
    "model.antithetic_time_sampling": _BOOL,
    "model.variance_gradient": _BOOL,
    "model.attention": _choice(*ATTENTION_KINDS),
    "model.batch_pieces": _POSITIVE_INT,
    "model.reconstruction_window": _NON_NEGATIVE_INT,
    "model.remat": _BOOL,
    "optimizer.learning_rate": _NON_NEGATIVE,
    "optimizer.b1": _UNIT,
    "optimizer.b2": _UNIT,
    "optimizer.eps": _NON_NEGATIVE,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.warmup_steps": _NON_NEGATIVE_INT,
    "optimizer.decay_steps": _NON_NEGATIVE_INT,
    "optimizer.end_learning_rate_factor": _NON_NEGATIVE,
    "optimizer.clip_norm": _NON_NEGATIVE,
    "optimizer.ema_decay": _UNIT,
    "training.batch_size": _POSITIVE_INT,
    "training.num_steps": _POSITIVE_INT,
    "training.log_every": _POSITIVE_INT,
    "training.eval_every": _NON_NEGATIVE_INT,
    "training.checkpoint_every": _POSITIVE_INT,
    "training.keep_checkpoints": _POSITIVE_INT,
    "training.steps_per_dispatch": _POSITIVE_INT,
    "training.sample_every": _NON_NEGATIVE_INT,
    "training.skip_nonfinite_updates": _NON_NEGATIVE_INT,
    "parallel.mode": _choice(*parallel.MODES),
    "parallel.num_devices": ("int", lambda v: v == -1 or v >= 1, "-1 (all) or a positive integer"),
    "parallel.data": ("int", lambda v: v == -1 or v >= 1, "-1 (the rest) or a positive integer"),
    "parallel.fsdp": ("int", lambda v: v == -1 or v >= 1, "-1 (the rest) or a positive integer"),
    "parallel.fsdp_min_size": _POSITIVE_INT,
    "eval.batch_size": _POSITIVE_INT,
    # 'train' or 'test'; tfds data sets also take split expressions such as 'test[:1000]'
    # (checked by opening the split, before anything is written).
    "eval.split": ("str", lambda v: True, "a split name such as 'test'"),
    "eval.discrete_steps": _NON_NEGATIVE_INT,
    "sampling.num_samples": _POSITIVE_INT,
    "sampling.sampler": _choice("ancestral", "ddim", "ode"),
    "sampling.num_steps": _POSITIVE_INT,
    "sampling.decode": _choice("argmax", "sample"),
}
# Fields added after the first release: configs written before them still run.
_DEFAULTS = {
    "data.augment": False,
    "training.skip_nonfinite_updates": 0,
    "parallel.data": -1,
    "parallel.fsdp": 1,
    "parallel.fsdp_min_size": parallel.DEFAULT_FSDP_MIN_SIZE,
}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _has_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return _is_int(value)
    if kind == "float":
        return (
            isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind == "bool":
        return isinstance(value, bool | np.bool_)
    if kind == "choice":
        return isinstance(value, str)
    if kind == "str":
        return isinstance(value, str) and bool(value)
    if kind == "path":
        return value is None or (isinstance(value, str) and bool(value))
    if kind == "ints":
        return isinstance(value, tuple | list) and all(_is_int(v) for v in value)
    raise AssertionError(kind)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field of an experiment config; touches no file and no device.

    Raises:
      ValueError: the first problem found, naming the field and the value: a value of the
        wrong type or out of range (see :data:`CONFIG_FIELDS`), an unknown field (with the
        closest known name) or a missing one, ``model.gamma_min >= model.gamma_max``,
        ``model.variance_gradient`` with ``model.num_steps > 0``, or ``data.name='folder'``
        without ``data.data_dir``.
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"config must be an ml_collections.ConfigDict, got {type(config).__name__}"
        )
    flat = _flatten(config.to_dict())
    for name in flat:
        if name not in CONFIG_FIELDS:
            close = difflib.get_close_matches(name, list(CONFIG_FIELDS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"unknown config field {name} (= {flat[name]!r}){hint}")
    for name, (kind, ok, expected) in CONFIG_FIELDS.items():
        if name not in flat:
            if name in _DEFAULTS:
                continue
            raise ValueError(f"config field {name} is missing (it must be {expected})")
        value = flat[name]
        if not _has_kind(value, kind) or not ok(value):
            raise ValueError(f"{name} must be {expected}, got {value!r}")
    m = config.model
    if not m.gamma_min < m.gamma_max:
        raise ValueError(
            "model.gamma_min must be below model.gamma_max, got "
            f"gamma_min={m.gamma_min}, gamma_max={m.gamma_max}"
        )
    if m.variance_gradient and m.num_steps:
        raise ValueError(
            "model.variance_gradient=True needs the continuous-time loss (model.num_steps=0), "
            f"got model.num_steps={m.num_steps}"
        )
    if config.data.name == "folder" and config.data.data_dir is None:
        raise ValueError(
            "data.data_dir must name the image folder (root/{train,test}/<class>/*.png) when "
            "data.name='folder'"
        )


def _option(config: ml_collections.ConfigDict, name: str) -> Any:
    section, field = name.split(".")
    return config[section].get(field, _DEFAULTS[name])


# --------------------------------------------------------------------------- building blocks


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> VDM:
    """The :class:`~vdm_jax.model.VDM` a config describes, for data with ``vocab_size`` values."""
    m = config.model
    if m.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {m.dtype!r}")
    for name in ("n_layer", "n_embd", "schedule_features"):
        if not isinstance(m[name], int) or m[name] < 1:
            raise ValueError(f"model.{name} must be a positive integer, got {m[name]!r}")
    net = ScoreUNet(
        n_layer=m.n_layer,
        n_embd=m.n_embd,
        gamma_min=m.gamma_min,
        gamma_max=m.gamma_max,
        dropout_rate=m.dropout_rate,
        attention_everywhere=m.attention_everywhere,
        with_fourier_features=m.with_fourier_features,
        fourier_exponents=tuple(m.fourier_exponents),
        norm_groups=m.norm_groups,
        num_classes=m.num_classes,
        dtype=jnp.dtype(m.dtype),
        attention=m.attention,
        batch_pieces=m.batch_pieces,
        remat=m.remat,
    )
    return VDM(
        score_net=net,
        schedule=make_schedule(m.schedule, m.gamma_min, m.gamma_max, m.schedule_features),
        vocab_size=vocab_size,
        num_steps=m.num_steps,
        antithetic_time_sampling=m.antithetic_time_sampling,
        variance_gradient=m.variance_gradient,
        reconstruction_window=m.reconstruction_window,
    )


def build_optimizer(config: ml_collections.ConfigDict):
    """(optax transformation, learning-rate schedule) from ``config.optimizer``."""
    o = config.optimizer
    kwargs = dict(
        learning_rate=o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
        weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, decay_steps=o.decay_steps,
        end_learning_rate_factor=o.end_learning_rate_factor, clip_norm=o.clip_norm,
    )  # fmt: skip
    if not 0.0 <= o.ema_decay < 1.0:
        raise ValueError(f"optimizer.ema_decay must be in [0, 1), got {o.ema_decay}")
    return steps.make_optimizer(**kwargs), steps.learning_rate_schedule(
        o.learning_rate, o.warmup_steps, o.decay_steps, o.end_learning_rate_factor
    )


def _check_workdir_path(workdir: str) -> str:
    """The absolute workdir; raises if it (or the nearest existing folder above it) is a file.

    Creates nothing (see :func:`_prepare_workdir`).
    """
    if not isinstance(workdir, str | os.PathLike) or not os.fspath(workdir):
        raise ValueError(f"workdir must be a folder path, got {workdir!r}")
    if _is_remote(workdir):  # e.g. gs://bucket/run: checked when prepared
        return os.fspath(workdir)
    workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir} exists and is not a folder")
    parent = workdir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"cannot create workdir {workdir}: {parent} is a file, not a folder")
    return workdir


def _is_remote(path: str | os.PathLike) -> bool:
    """A URL such as ``gs://bucket/run`` (a cloud bucket every host of a pod can reach)."""
    return "://" in os.fspath(path)


def _prepare_workdir(workdir: str) -> str:
    """Creates ``workdir`` if needed and proves it writable by creating (and removing) a file:
    ``os.access`` is not enough for root or read-only file systems."""
    if _is_remote(workdir):
        probe = epath.Path(workdir) / f".write-probe-{os.getpid()}-{jax.process_index()}"
        try:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except Exception as e:
            raise ValueError(f"workdir {workdir} is not writable: {e}") from None
        return workdir
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create workdir {workdir}: {e.strerror}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"workdir {workdir} is not writable: {e.strerror}") from None
    return workdir


def _write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new file, whole."""
    if _is_remote(path):  # an object store replaces an object whole
        epath.Path(path).write_text(text)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricWriter:
    """metrics.jsonl and TensorBoard event files in ``workdir``; writes on process 0 only."""

    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self._active:
            from tensorboardX import SummaryWriter  # imported lazily: slow import

            path = os.path.join(workdir, "metrics.jsonl")
            self._jsonl = _RemoteAppend(path) if _is_remote(path) else open(path, "a")
            # A run killed while writing leaves a partial last line: start on a fresh one.
            if not _is_remote(path) and self._jsonl.tell() > 0:
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        self._jsonl.write("\n")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Append one record at ``step``."""
        if not self._active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k != "step" and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._active:
            self._jsonl.close()
            self._tb.close()


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
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = pixels[
            i
        ]
    grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with epath.Path(path).open("wb") as f:
        Image.fromarray(grid[..., 0] if c == 1 else grid).save(f, format="PNG")
    return path


def _stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _host_metrics(metrics: Any) -> dict[str, float]:
    """Device metrics (possibly with device or step axes) to floats: the last step's values."""
    return {k: float(np.asarray(jax.device_get(v)).reshape(-1)[-1]) for k, v in metrics.items()}


# --------------------------------------------------------------------------- non-finite guard

# The guard travels with the state through the compiled step (so it costs no host round trip):
# it records the first fatal step, a bit mask of its non-finite terms (two bits per term: NaN,
# +-Inf), the current run of bad steps, and how many updates were skipped.
_NO_STEP = -1


def _init_guard() -> dict[str, jax.Array]:
    zero = jnp.zeros((), jnp.int32)
    return {
        "fatal_step": jnp.full((), _NO_STEP, jnp.int32),
        "fatal_terms": zero,
        "fatal_streak_start": zero,
        "streak_start": zero,
        "consecutive": zero,
        "skipped": zero,
    }


def _guarded_step(step_fn: Any, skip: int, term_names: list[str]) -> Any:
    """Wraps a train step ``(state, batch, key) -> (state, metrics)`` into one on
    ``(state, guard)`` that checks every loss term, the gradient norm and the new parameters.

    An update is *bad* when any of them is NaN or Inf. With ``skip == 0`` the first bad update
    is fatal (the host raises when it next reads the guard). With ``skip > 0`` a bad update
    is replaced by the old state (only the step advances) and counted; the ``skip + 1``-th bad
    update in a row is fatal. ``term_names`` receives the names the bits refer to.
    """

    def guarded(carry, batch, key, *, num_shards, axis_name):
        state, guard = carry
        new_state, metrics = step_fn(state, batch, key, num_shards=num_shards, axis_name=axis_name)
        names = sorted(k for k in metrics if k != "lr")
        term_names[:] = [*names, "params"]
        bits = jnp.zeros((), jnp.int32)
        for i, name in enumerate(names):
            value = metrics[name]
            bits |= jnp.where(jnp.any(jnp.isnan(value)), 1 << (2 * i), 0)
            bits |= jnp.where(jnp.any(jnp.isinf(value)), 2 << (2 * i), 0)
        # One fused pass: x * 0 is NaN exactly where x is NaN or +-Inf.
        probe = sum(jnp.sum(x * 0) for x in jax.tree.leaves(new_state.params))
        bits |= jnp.where(jnp.isnan(probe), 1 << (2 * len(names)), 0)
        bad = bits != 0
        step = new_state.step
        consecutive = jnp.where(bad, guard["consecutive"] + 1, 0)
        streak_start = jnp.where(bad & (guard["consecutive"] == 0), step, guard["streak_start"])
        fatal = bad & (consecutive > skip) & (guard["fatal_step"] == _NO_STEP)
        guard = {
            "fatal_step": jnp.where(fatal, step, guard["fatal_step"]),
            "fatal_terms": jnp.where(fatal, bits, guard["fatal_terms"]),
            "fatal_streak_start": jnp.where(fatal, streak_start, guard["fatal_streak_start"]),
            "streak_start": streak_start,
            "consecutive": consecutive,
            "skipped": guard["skipped"] + (bad & (skip > 0)).astype(jnp.int32),
        }
        if skip > 0:
            kept = jax.tree.map(lambda new, old: jnp.where(bad, old, new), new_state, state)
            new_state = kept.replace(step=step)
        return (new_state, guard), metrics

    return guarded


def _describe_terms(bits: int, names: list[str]) -> str:
    parts = []
    for i, name in enumerate(names):
        nan, inf = (bits >> (2 * i)) & 1, (bits >> (2 * i + 1)) & 1
        if name == "params" and nan:
            parts.append("params (non-finite after the update)")
        elif nan or inf:
            parts.append(f"{name}={'nan' if nan else ''}{'/' if nan and inf else ''}"
                         f"{'inf' if inf else ''}")  # fmt: skip
    return ", ".join(parts) or "unknown terms"


def _check_guard(guard: dict[str, Any], names: list[str], skip: int, run: _Run) -> None:
    """Raises :class:`TrainingDivergedError` if the guard recorded a fatal step."""
    fatal = int(guard["fatal_step"])
    if fatal == _NO_STEP:
        return
    terms = _describe_terms(int(guard["fatal_terms"]), names)
    latest = run.checkpointer.latest_step()
    kept = (
        f"the last good checkpoint, step {latest}, is intact in {run.checkpointer.directory}"
        if latest is not None
        else "no checkpoint had been written yet"
    )
    if skip:
        first = int(guard["fatal_streak_start"])
        what = (
            f"{fatal - first + 1} non-finite updates in a row (steps {first} to {fatal}), more "
            f"than training.skip_nonfinite_updates={skip} allows; at step {fatal} non-finite "
            f"{terms}"
        )
    else:
        what = f"non-finite {terms}"
    raise TrainingDivergedError(
        f"training diverged at step {fatal}: {what}. Nothing from step {fatal} on was saved; "
        f"{kept}. Lower optimizer.learning_rate, set optimizer.clip_norm, or set "
        "training.skip_nonfinite_updates to skip such updates."
    )


# --------------------------------------------------------------------------- setup shared by modes


def _check_eval_source(source: Any, info: data.DatasetInfo, split: str) -> None:
    """The evaluation split must look like the training split (shape and vocabulary)."""
    other = source.info
    if tuple(other.image_shape) != tuple(info.image_shape):
        raise ValueError(
            f"data: the {split!r} split's images have shape {tuple(other.image_shape)} but the "
            f"training split's have {tuple(info.image_shape)}; both splits must match"
        )
    if other.vocab_size != info.vocab_size:
        raise ValueError(
            f"data: the {split!r} split has {other.vocab_size} pixel values, the training "
            f"split {info.vocab_size}"
        )


class _Run:
    """Everything the three modes share: data, model, parallel layout, checkpoints.

    Construction checks the config, the data, the model, the devices and the workdir, in
    that order, and creates the workdir and its checkpoint folder only once all of that
    passed. ``mode`` is 'train', 'eval' or 'sample' (which splits must be readable).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, mode: str):
        check_config(config)
        self.config = config
        path = _check_workdir_path(workdir)
        if mode != "train" and not epath.Path(path).is_dir():
            raise ValueError(
                f"workdir {path} does not exist: train first (--mode=train) or point "
                "--workdir at a training run"
            )
        d = config.data
        self.train_source = None
        self.eval_source = None
        if mode == "train":
            self.train_source = data.make_source(d.name, "train", data_dir=d.data_dir)
            self.info = self.train_source.info
        else:
            self.info = data.dataset_info(d.name, data_dir=d.data_dir)
        if mode in ("train", "eval"):
            self.eval_source = data.make_source(d.name, config.eval.split, data_dir=d.data_dir)
            _check_eval_source(self.eval_source, self.info, config.eval.split)
        if 0 < config.model.num_classes < self.info.num_classes:
            raise ValueError(
                f"model.num_classes={config.model.num_classes} is smaller than the data's "
                f"{self.info.num_classes} classes (labels 0..{self.info.num_classes - 1}); use "
                f"{self.info.num_classes}, or 0 for an unconditional model"
            )
        height, width = self.info.image_shape[:2]
        if _option(config, "data.augment") and height != width:
            raise ValueError(
                f"data.augment=True rotates images by 90 degrees, but the data's are {height}x"
                f"{width}; use square images or data.augment=False"
            )
        self.model = build_model(config, self.info.vocab_size)
        self.optimizer, self.lr_fn = build_optimizer(config)
        mesh = parallel.make_mesh(
            config.parallel.num_devices,
            data=_option(config, "parallel.data"),
            fsdp=_option(config, "parallel.fsdp"),
        )
        self.dp = parallel.DataParallel(
            config.parallel.mode, mesh, fsdp_min_size=_option(config, "parallel.fsdp_min_size")
        )
        self.dp.check_batch_size(config.training.batch_size)
        # This process's block of every global batch (the data pipelines' process index).
        self.data_slot, self.data_slots = self.dp.process_batch_slot()
        self.num_dims = math.prod(self.info.image_shape)
        self.use_labels = config.model.num_classes > 0
        self.key = jax.random.key(config.seed)
        # Tracing the initialisation runs the model's own checks, still before any file.
        self.abstract_state = jax.eval_shape(self._init_state)
        self.workdir = _prepare_workdir(path)
        self._eval_steps: dict[int | None, Any] = {}
        self.checkpointer = checkpoint.Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            save_interval_steps=config.training.checkpoint_every,
            max_to_keep=config.training.keep_checkpoints,
        )

    def _init_state(self) -> steps.TrainState:
        example = jnp.zeros((1, *self.info.image_shape), jnp.uint8)
        labels = jnp.zeros((1,), jnp.int32) if self.use_labels else None
        key = jax.random.fold_in(self.key, 0x5EED)
        return steps.init_state(self.model, self.optimizer, key, example, labels)

    def _state_sharding(self) -> Any:
        """Where the state lives between steps (pmap: replicated, stacked by put_state)."""
        if self.dp.mode == "pmap":
            return jax.tree.map(lambda _: self.dp.replicated, self.abstract_state)
        return self.dp.state_sharding(self.abstract_state)

    def init_state(self) -> steps.TrainState:
        """A new state, created in place on the devices (every process computes the same)."""
        return jax.jit(self._init_state, out_shardings=self._state_sharding())()

    def restore(self, need: bool) -> checkpoint.Restored | None:
        abstract = jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            self.abstract_state,
            self._state_sharding(),
        )
        restored = self.checkpointer.restore(
            abstract, config=self.config.to_dict(), compatible_keys=RESUME_KEYS
        )
        if restored is None and need:
            raise ValueError(
                f"no checkpoint in {self.checkpointer.directory}: train first "
                "(--mode=train) or point --workdir at a training run"
            )
        return restored

    def close(self, quiet: bool = False) -> None:
        """Waits for a pending checkpoint write; with ``quiet`` (already failing) only logs
        its error."""
        try:
            self.checkpointer.close()
        except Exception as e:
            if not quiet:
                raise
            logging.error("while stopping: %s", e)

    def evaluate(self, params: Any, step: int) -> dict[str, float]:
        """One exact pass over the evaluation split with ``params``; bits/dim metrics."""
        cfg = self.config.eval
        source = self.eval_source
        batch_size = cfg.batch_size + (-cfg.batch_size) % self.dp.num_shards
        params = self.dp.put_params(params)
        results = {}
        for name, num_steps in (("", None), (f"T{cfg.discrete_steps}_", cfg.discrete_steps)):
            if num_steps == 0:
                continue
            if num_steps not in self._eval_steps:  # compiled once per run, not per evaluation
                self._eval_steps[num_steps] = self.dp.compile_eval_step(
                    parallel.make_eval_step(self.model, num_steps), params=params
                )
            fn = self._eval_steps[num_steps]
            acc = evaluation.BpdAccumulator()
            batches = data.make_eval_iterator(
                source, global_batch_size=batch_size, process_index=self.data_slot,
                process_count=self.data_slots,
            )  # fmt: skip
            for i, batch in enumerate(batches):
                # Global batch i holds records i * B .. i * B + B - 1 (make_eval_iterator), so
                # every process knows the whole batch's mask without asking the others.
                batch.pop("mask")
                mask = np.arange(i * batch_size, (i + 1) * batch_size) < len(source)
                if not self.use_labels:
                    batch.pop("label", None)
                key = jax.random.fold_in(jax.random.fold_in(self.key, 0xE7A1), i)
                terms = fn(params, self.dp.put_global_batch(batch), key)
                acc.add(parallel.to_host(terms), mask)
            result = acc.result(self.num_dims)
            results.update(result.as_dict(prefix=f"{cfg.split}/{name}"))
        logging.info(
            "step %d: %s bpd %.4f +- %.4f over %d examples", step, cfg.split,
            results[f"{cfg.split}/bpd"], results[f"{cfg.split}/bpd_stderr"],
            int(results[f"{cfg.split}/num_examples"]),
        )  # fmt: skip
        return results

    def write_samples(self, params: Any, step: int) -> str | None:
        """Sample with ``params`` and write a PNG grid; returns its path (process 0)."""
        cfg = self.config.sampling
        shape = (cfg.num_samples, *self.info.image_shape)
        key = jax.random.fold_in(jax.random.fold_in(self.key, 0x5A3F), step)
        variables = {"params": parallel.to_host(params)}
        start = time.time()
        if cfg.sampler == "ancestral":
            images = sampling.ancestral_sample(
                self.model, variables, key, shape=shape, num_steps=cfg.num_steps,
                decode=cfg.decode,
            )  # fmt: skip
        elif cfg.sampler == "ddim":
            images = sampling.ddim_sample(
                self.model, variables, key, shape=shape, num_steps=cfg.num_steps,
                decode=cfg.decode,
            )  # fmt: skip
        else:
            images = sampling.ode_sample(self.model, variables, key, shape=shape, decode=cfg.decode)
        images = np.asarray(jax.device_get(images))
        logging.info(
            "sampled %d images (%s) in %.1f s", len(images), cfg.sampler, time.time() - start
        )
        if jax.process_index() != 0:
            return None
        path = os.path.join(self.workdir, "samples", f"samples_step{step:08d}.png")
        return save_image_grid(images, path, self.info.vocab_size)


# --------------------------------------------------------------------------- the three modes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> steps.TrainState:
    """Train (resuming from the latest checkpoint in ``workdir`` if any), evaluate, sample.

    Args:
      config: an experiment config (:mod:`vdm_jax.configs`).
      workdir: output folder; created if needed.

    Returns:
      The final :class:`~vdm_jax.training.steps.TrainState` (host arrays, no device axis); after a
      preemption (SIGTERM), the state that was saved.

    Raises:
      ValueError: a bad config value, unreadable or inconsistent data, an unusable workdir,
        or a checkpoint written with an incompatible config; raised before anything is
        written.
      TrainingDivergedError: a non-finite loss, gradient or parameter (see the module doc).
      checkpoint.CheckpointCorruptError: checkpoints exist but none can be restored.
      checkpoint.CheckpointSaveError: a checkpoint could not be written (disk full).
    """
    run = _Run(config, workdir, "train")
    # Installed early, so a SIGTERM during start-up or compilation is not fatal either.
    preemption = PreemptionWatcher().install()
    try:
        state = _train(run, preemption)
    except BaseException:
        preemption.close()
        run.close(quiet=True)
        raise
    run.close()
    return state


def _train(run: _Run, preemption: PreemptionWatcher) -> steps.TrainState:
    config = run.config
    cfg = config.training
    skip = int(_option(config, "training.skip_nonfinite_updates"))
    iterator = data.make_train_iterator(
        run.train_source, global_batch_size=cfg.batch_size, seed=config.seed,
        process_index=run.data_slot, process_count=run.data_slots,
        augment=_option(config, "data.augment"),
    )  # fmt: skip
    restored = run.restore(need=False)
    if restored is None:
        state = run.init_state()
        logging.info("starting a new run in %s", run.workdir)
    else:
        state = restored.state
        if restored.data_state is not None:
            try:
                iterator.set_state(restored.data_state)
            except Exception as e:
                detail = " ".join(str(e).split())
                raise ValueError(
                    f"cannot resume the input pipeline from the checkpoint at step "
                    f"{restored.step} in {run.checkpointer.directory}: did the training data "
                    "change since it was written? Use the same data, or a new workdir. "
                    f"({type(e).__name__}: {detail})"
                ) from e
        logging.info("resumed from step %d in %s", restored.step, run.workdir)
    step = int(jax.device_get(state.step))
    k = cfg.steps_per_dispatch
    # Read the first batches before writing anything: unreadable images fail here.
    pending = [next(iterator) for _ in range(k)] if step < cfg.num_steps else None

    writer = MetricWriter(run.workdir)
    try:
        if jax.process_index() == 0:
            _write_atomically(os.path.join(run.workdir, "config.json"), config.to_json(indent=2))
        return _loop(run, preemption, iterator, state, pending, writer, skip)
    finally:
        writer.close()


def _loop(run, preemption, iterator, state, pending, writer, skip) -> steps.TrainState:
    config = run.config
    cfg = config.training
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "model: %d parameters; data %s %s, vocab %d; %d devices (%s)", n_params,
        config.data.name, run.info.image_shape, run.info.vocab_size, run.dp.num_shards,
        run.dp.mode,
    )  # fmt: skip
    term_names: list[str] = []
    step_fn = run.dp.compile_train_step(
        _guarded_step(
            parallel.make_train_step(
                run.model, run.optimizer, config.optimizer.ema_decay, run.lr_fn
            ),
            skip,
            term_names,
        ),
        cfg.steps_per_dispatch,
        state=None if run.dp.mode == "pmap" else (state, _init_guard()),
    )
    carry = run.dp.put_state((state, _init_guard()))
    del state
    step = int(jax.device_get(run.dp.get_state(carry)[0].step))
    k = cfg.steps_per_dispatch
    start_step, start_time = step, time.time()

    def due(every: int) -> bool:
        return every > 0 and (step % every < k or step >= cfg.num_steps)

    # should_stop, not .received: every process must take the same decision at the same step.
    stop = step < cfg.num_steps and preemption.should_stop(step)
    if stop:
        logging.warning("preempted before the first step: nothing new to save; exiting")
    while step < cfg.num_steps and not stop:
        batches = pending or [next(iterator) for _ in range(k)]
        pending = None
        batch = batches[0] if k == 1 else _stack(batches)
        if not run.use_labels:
            batch = {"image": batch["image"]}
        carry, metrics = step_fn(carry, run.dp.put_batch(batch, stacked=k > 1), run.key)
        step += k
        stop = preemption.should_stop(step)
        # orbax's policy decides the periodic saves; the last step and a preemption force one.
        saving = stop or step >= cfg.num_steps or run.checkpointer.should_save(step)
        logging_now = due(cfg.log_every)
        evaluating = due(cfg.eval_every) and step < cfg.num_steps
        sampling_now = due(cfg.sample_every) and step < cfg.num_steps
        if saving or logging_now or evaluating or sampling_now:
            # The only host round trip of a step, and only at these steps.
            guard = jax.device_get(run.dp.get_state(carry)[1])
            _check_guard(guard, term_names, skip, run)
        if logging_now:
            host = _host_metrics(metrics)
            elapsed = time.time() - start_time
            rate = (step - start_step) / max(elapsed, 1e-9)
            eta = (cfg.num_steps - step) / max(rate, 1e-9)
            host["steps_per_sec"] = rate
            if skip:
                host["skipped_updates"] = float(guard["skipped"])
            writer.write(step, host)
            logging.info(
                "step %d/%d  bpd %.4f (prior %.4f, recon %.4f, diff %.4f)  gamma [%.2f, %.2f]"
                "  %.2f steps/s  ETA %s", step, cfg.num_steps, host["bpd"], host["prior_bpd"],
                host["reconstruction_bpd"], host["diffusion_bpd"], host["gamma_0"],
                host["gamma_1"], rate, _format_seconds(eta),
            )  # fmt: skip
        if saving:
            run.checkpointer.save(
                step, run.dp.get_state(carry)[0], data_state=iterator.get_state(),
                config=config.to_dict(), force=True,
            )  # fmt: skip
        if stop:
            run.checkpointer.wait_until_finished()
            logging.warning(
                "preempted: saved a checkpoint at step %d in %s; exiting (run the same command "
                "to resume)", step, run.checkpointer.directory,
            )  # fmt: skip
            break
        if evaluating:
            writer.write(step, run.evaluate(run.dp.get_state(carry)[0].ema_params, step))
        if sampling_now:
            run.write_samples(run.dp.get_state(carry)[0].ema_params, step)

    final = parallel.to_host(run.dp.get_state(carry)[0])
    del carry
    run.checkpointer.wait_until_finished()
    # From here on the checkpoint is complete: a SIGTERM may end the process at once.
    preemption.close()
    if step >= cfg.num_steps and not stop:
        results = run.evaluate(final.ema_params, step)
        baseline = independent_baseline(config, run.info)
        results[f"{config.eval.split}/independent_pixel_baseline_bpd"] = baseline
        writer.write(step, results)
        path = run.write_samples(final.ema_params, step)
        elapsed = time.time() - start_time
        logging.info(
            "done: %d steps in %s (%.2f steps/s); %s bpd %.4f (per-pixel independent baseline "
            "%.4f bpd); samples in %s", step - start_step, _format_seconds(elapsed),
            (step - start_step) / max(elapsed, 1e-9), config.eval.split,
            results[f"{config.eval.split}/bpd"], baseline, path,
        )  # fmt: skip
    return final


def independent_baseline(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> float:
    """Bits/dim of the best per-pixel independent model fitted on the train split."""
    train_src = data.make_source(config.data.name, "train", data_dir=config.data.data_dir)
    test_src = data.make_source(config.data.name, config.eval.split, data_dir=config.data.data_dir)
    limit = 20_000  # a sample is plenty for a reference figure on large data sets

    def images(src):
        return np.stack([src[i]["image"] for i in range(min(len(src), limit))])

    return evaluation.independent_pixel_bpd(images(train_src), images(test_src), info.vocab_size)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluate the latest checkpoint's EMA parameters: one exact pass over the test split.

    Returns the metrics (also appended to ``workdir/metrics.jsonl``).
    """
    run = _Run(config, workdir, "eval")
    try:
        restored = run.restore(need=True)
        results = run.evaluate(restored.state.ema_params, restored.step)
        writer = MetricWriter(run.workdir)
        writer.write(restored.step, results)
        writer.close()
    finally:
        run.close(quiet=True)
    return results


def sample(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Sample from the latest checkpoint's EMA parameters; returns the PNG's path."""
    run = _Run(config, workdir, "sample")
    try:
        restored = run.restore(need=True)
        path = run.write_samples(restored.state.ema_params, restored.step)
    finally:
        run.close(quiet=True)
    if path:
        logging.info("wrote %s", path)
    return path


#: Folded into the run's key for the report's per-t diffusion loss.
REPORT_STREAM = 0x4E9


def report(
    config: ml_collections.ConfigDict, workdir: str, *, num_images: int = 512, num_bins: int = 32
) -> str:
    """Write the report of the run in ``workdir`` (:mod:`vdm_jax.training.report`) from its
    metrics, its latest checkpoint's EMA parameters and its sample grids; the diffusion loss
    per t uses ``num_bins`` time bins and the first ``num_images`` images of the evaluation
    split. Returns the path of ``workdir/report/index.html``.

    Raises:
      ValueError: a bad config, no workdir, no checkpoint or no metrics in it.
    """
    run = _Run(config, workdir, "eval")
    try:
        restored = run.restore(need=True)
        initial = run.init_state().params
    finally:
        run.close(quiet=True)
    source = run.eval_source
    items = [source[i] for i in range(min(len(source), num_images))]
    page = report_io.write_report(
        run.workdir,
        model=run.model,
        variables={"params": parallel.to_host(restored.state.ema_params)},
        initial_variables={"params": parallel.to_host(initial)},
        step=restored.step,
        images=np.stack([item["image"] for item in items]),
        labels=np.asarray([item["label"] for item in items]) if run.use_labels else None,
        key=jax.random.fold_in(run.key, REPORT_STREAM),
        split=config.eval.split,
        title=f"VDM run report: {config.data.name}, {run.workdir}",
        config_json=config.to_json(indent=2),
        num_bins=num_bins,
        batch_size=config.eval.batch_size,
    )
    logging.info("wrote the report %s", page)
    return page


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
