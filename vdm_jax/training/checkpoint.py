"""Checkpoints of a training run: a thin layer over orbax's ``CheckpointManager``.

A checkpoint is a folder ``<directory>/<step>/`` of three orbax items: ``state`` (the training
state; each process writes its shards), ``data_state`` (the input pipeline's position, one
JSON item: every process is at the same position, so process 0 writes it) and ``config``.
orbax decides when to save (the interval, a JAX preemption sync point, ``force``) and what to
keep, and writes in the background into ``<step>.orbax-checkpoint-tmp``, renamed once
complete. Example::

  with Checkpointer(workdir / "checkpoints", save_interval_steps=1000, max_to_keep=3) as ckpt:
      restored = ckpt.restore(abstract_state, config=cfg, compatible_keys=["model.n_embd"])
      if restored is not None:  # None on a fresh start
          state, start = restored.state, restored.step + 1
          train_iter.set_state(restored.data_state)
      for step in range(start, num_steps + 1):
          state = train_step(state, next(train_iter))
          ckpt.save(step, state, data_state=train_iter.get_state(), config=cfg)

What orbax lacks, added here:

* restore falls back from a damaged newest step (truncated or deleted files) to the previous
  good one with a warning, and renames the damaged folders ``<step>.corrupt-<UTC time>``
  (orbax ignores them; nothing is deleted);
* a failed write (a full disk) raises :class:`CheckpointSaveError` naming the folder and the
  cause; orbax deletes old checkpoints only after a newer one is complete, so they are intact;
* :func:`check_compatible` refuses to resume from a checkpoint of another config;
* restore requires target shardings, so a checkpoint moves across device counts and layouts.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vdm_jax.errors import UserError

__all__ = [
    "CheckpointCorruptError", "CheckpointSaveError", "Checkpointer", "Restored",
    "check_compatible", "write_text",
]  # fmt: skip

_TMP = ".orbax-checkpoint-tmp"  # orbax's suffix for the folders of unfinished saves


class CheckpointCorruptError(RuntimeError):
    """Checkpoints exist but none of them can be restored; nothing on disk was changed."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (e.g. disk full); the message names the folder, the cause
    and the latest complete checkpoint, which is intact."""


class Restored(NamedTuple):
    """A restored checkpoint: its ``step``, the ``state`` (structure, dtypes and shardings of
    the restore target), the ``data_state`` as passed to ``save`` (bytes, dict or None), and
    the ``config`` it was written with (JSON types: tuples come back as lists)."""

    step: int
    state: Any
    data_state: bytes | dict | None
    config: dict


def check_compatible(
    saved_config: Mapping[str, Any],
    config: Mapping[str, Any],
    keys: Sequence[str],
    *,
    source: str = "the checkpoint",
    saved_defaults: Mapping[str, Any] | None = None,
) -> None:
    """Raises :class:`~vdm_jax.errors.UserError` if resuming would change a config value.

    Args:
      saved_config, config: the checkpoint's config and this run's, as nested dicts.
      keys: dotted paths such as ``"model.n_embd"`` that must agree. Values are compared
        after a JSON round trip (a tuple equals a list); a key missing from one config only
        is a difference, missing from both is not.
      source: how the message names the checkpoint, e.g. ``"checkpoint at /w/ckpt/200"``.
      saved_defaults: a nested dict of the values a checkpoint written before a key existed
        stands for (the schema's defaults), so that a field added since does not refuse an
        older run; None: a missing key is a difference.
    """
    diffs = []
    for key in [keys] if isinstance(keys, str) else keys:
        old, new = _lookup(saved_config, key), _lookup(config, key)
        if old == "<missing>" and saved_defaults is not None:
            old = _lookup(saved_defaults, key)
        if old != new:
            diffs.append(f"{key}={old} (this run has {new})")
    if diffs:
        raise UserError(
            f"{source} was written with {', '.join(diffs)}. These keys must match to resume: "
            "rerun with the checkpoint's values, or use a new working directory."
        )


def _lookup(config: Any, dotted_key: str) -> str:
    """The value at ``dotted_key``, shown as in messages (JSON types), or ``<missing>``."""
    for part in dotted_key.split("."):
        try:
            config = config[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return repr(json.loads(json.dumps(config, sort_keys=True, default=repr)))


def write_text(path: epath.Path, text: str) -> None:
    """Writes one JSON file of a checkpoint (the ``data_state`` and ``config`` items) into the
    unfinished ``<step>.orbax-checkpoint-tmp`` folder, during orbax's background write, on
    process 0.

    The failure-injection point of this module: replace it (e.g. ``monkeypatch.setattr(
    checkpoint, "write_text", fail)`` with a ``fail(path, text)`` that raises
    ``OSError(errno.ENOSPC, ...)`` for one step's folder) to make a save fail as a full disk
    would; the failure then reaches the caller as :class:`CheckpointSaveError`, by the same
    path as a real one.
    """
    path.write_text(text)


class _JsonHandler(ocp.JsonCheckpointHandler):
    """orbax's handler of a JSON item, writing through :func:`write_text`."""

    def __init__(self, filename: str = "metadata"):
        super().__init__(filename)
        self._file = filename

    async def async_save(self, directory, item=None, args=None):
        if args is not None:
            item = args.item

        async def write() -> None:
            if jax.process_index() == 0:
                write_text(epath.Path(directory) / self._file, json.dumps(item))

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="json_save")]


class Checkpointer:
    """Saves and restores the checkpoints in one folder (see the module docstring).

    Every process of a multi-host job creates it with the same arguments and calls ``save``
    and ``restore`` together; :meth:`close` (or a ``with`` block) completes a pending save.

    Args:
      directory: the checkpoint folder (created if missing; ``gs://`` paths work too).
      save_interval_steps: save once a multiple of this is passed after the latest save.
      max_to_keep: how many of the newest checkpoints to keep (None: all); 2 or more leave a
        predecessor to fall back to if the newest turns out damaged.
      async_save: write in a background thread; False writes before ``save`` returns.
      read_only: only restore (``save`` raises RuntimeError); nothing is created.

    Raises UserError for a non-positive interval or ``max_to_keep``, or a ``directory`` that
    is not a folder, cannot be created or (unless ``read_only``) is not writable.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_interval_steps: int,
        max_to_keep: int | None,
        async_save: bool = True,
        read_only: bool = False,
    ):
        ok = [
            isinstance(n, int | np.integer) and n >= 1 for n in (save_interval_steps, max_to_keep)
        ]
        if not ok[0] or not (ok[1] or max_to_keep is None):
            raise UserError(
                "Checkpointer: save_interval_steps and max_to_keep must be positive integers "
                f"(max_to_keep may be None), got {save_interval_steps!r} and {max_to_keep!r}"
            )
        self._directory = _prepare_directory(directory, read_only=read_only)
        self._read_only = read_only
        every = int(save_interval_steps)
        # A reader passes no save policy: orbax would warn that it drops one.
        saving = {} if read_only else dict(
            # Once a multiple of `every` is passed (unlike `step % every == 0`, this holds when
            # the loop advances several steps per call); orbax adds JAX's preemption points.
            should_save_fn=lambda step, latest: step // every > (latest or 0) // every,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep and int(max_to_keep)),
        )  # fmt: skip
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False,  # nothing is deleted at start-up
            create=not read_only,
            read_only=read_only,
            **saving,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in ("data_state", "config"):
            handler = _JsonHandler()
            registry.add(item, ocp.args.JsonSave, handler)
            registry.add(item, ocp.args.JsonRestore, handler)
        self._manager = ocp.CheckpointManager(
            self._directory, options=options, handler_registry=registry
        )
        self._pending_step: int | None = None

    @property
    def directory(self) -> epath.Path:
        """The checkpoint folder."""
        return self._directory

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints (and of a save in flight), ascending."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step of :meth:`all_steps`, or None."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether orbax's policy saves at ``step`` (the interval, a preemption sync point)."""
        return self._manager.should_save(int(step))

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: bytes | Mapping[str, Any] | None,
        config: Mapping[str, Any],
        force: bool = False,
    ) -> bool:
        """Starts writing ``state`` (a pytree of ``jax.Array``, sharded or not) at ``step`` if
        :meth:`should_save` or ``force`` (the last step, a preemption), but never at or behind
        an existing step; returns whether it did.

        ``data_state`` is the input pipeline's position, the same on every process: UTF-8
        JSON ``bytes`` (restored byte for byte), a JSON-able dict, or None; ``config`` is the
        run's config as a JSON-able dict. The call returns once the arrays are on the host
        (``state`` may be donated at once); a failure of the background write raises
        :class:`CheckpointSaveError` from the next ``save``, :meth:`wait_until_finished` or
        :meth:`close`. RuntimeError if read-only; TypeError if not JSON-able.
        """
        if self._read_only:
            raise RuntimeError(f"Checkpointer for {self._directory} is read-only; cannot save")
        step, latest = int(step), self.latest_step()
        if latest is not None and step < latest:
            logging.warning("Not saving step %d in %s: it holds a newer checkpoint, step %d.",
                            step, self._directory, latest)  # fmt: skip
        if (latest is not None and step <= latest) or not (force or self.should_save(step)):
            return False
        items = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(_json(data_state, "data_state")),
            config=ocp.args.JsonSave(_json(config, "config")),
        )
        self.wait_until_finished()  # a failed previous save is reported under its own step
        self._pending_step = step
        return self._reporting(self._manager.save, step, args=items, force=True)

    def wait_until_finished(self) -> None:
        """Blocks until a pending save is on disk (:class:`CheckpointSaveError` if it failed)."""
        self._reporting(self._manager.wait_until_finished)

    def close(self) -> None:
        """Waits for a pending save, then releases orbax's threads (also if the save failed)."""
        self._reporting(self._manager.close)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _reporting(self, write: Any, *args: Any, **kwargs: Any) -> Any:
        """``write(*args, **kwargs)``, its errors raised as :class:`CheckpointSaveError`."""
        try:
            return write(*args, **kwargs)
        except Exception as error:
            step, self._pending_step = self._pending_step, None
            try:
                self._manager.reload()
                steps = [s for s in self.all_steps() if s != step]
            except Exception:  # the folder itself may be gone
                steps = []
            kept = f"intact (latest: step {steps[-1]})" if steps else "none yet"
            what = "a checkpoint" if step is None else f"the checkpoint for step {step}"
            raise CheckpointSaveError(
                f"Could not write {what} in {self._directory}: {_describe(error, write=True)}. "
                f"Nothing was overwritten; the checkpoints already complete are {kept}, and the "
                f"unfinished '*{_TMP}' folder is ignored. Free space (or fix the folder) and run "
                "the same command again to resume."
            ) from error

    def restore(
        self,
        target: Any,
        step: int | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        compatible_keys: Sequence[str] = (),
        saved_defaults: Mapping[str, Any] | None = None,
        partial: bool = False,
    ) -> Restored | None:
        """Restores a :class:`Restored`, or None when the folder holds no complete checkpoint.

        ``target`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (ValueError
        without), or of ``jax.Array``: the arrays come back with these shardings, whatever
        devices saved them. ``step`` picks one step (no fallback; UserError if absent); with
        None the newest is tried first, and a damaged one (a missing item folder, a truncated
        or deleted file) is named in a warning and the next older one tried. Once one
        restores, the damaged newer folders are renamed ``<step>.corrupt-<UTC time>`` (rename
        one back to retry it). Before a candidate's state is read, its config is checked
        against ``config`` on ``compatible_keys`` (:func:`check_compatible` with
        ``saved_defaults``, UserError).
        With ``partial``, ``target`` may be a part of the saved state (a dict of some of its
        fields, e.g. ``{'ema_params': ...}``): only those arrays are read, and no data
        position (``data_state`` is None). A read-only checkpointer leaves damaged folders
        where they are (a warning names them).

        Raises:
          CheckpointCorruptError: checkpoints exist but none restores (nothing is changed).
        """
        flat = jax.tree_util.tree_flatten_with_path(target)[0]
        if bad := [jax.tree_util.keystr(p) for p, leaf in flat if not _has_devices(leaf)]:
            raise ValueError(
                f"Checkpointer.restore: target leaves without a concrete sharding: "
                f"{', '.join(bad[:5])}{' ...' if bad[5:] else ''}. Give each a sharding over "
                "real devices, e.g. jax.ShapeDtypeStruct(x.shape, x.dtype, sharding="
                "NamedSharding(mesh, spec)) (jax.eval_shape gives None, or an AbstractMesh)."
            )
        self.wait_until_finished()
        self._manager.reload()
        if unfinished := sorted(p.name for p in self._directory.glob(f"*{_TMP}*")):
            logging.warning("Ignoring unfinished checkpoint saves %s in %s (never restored).",
                            unfinished, self._directory)  # fmt: skip
        steps = self.all_steps()
        if step is not None and int(step) not in steps:
            raise UserError(f"no checkpoint for step {step} in {self._directory}; steps: {steps}")
        failures: list[tuple[int, str]] = []
        for candidate in [int(step)] if step is not None else steps[::-1]:
            restored, reason = self._try_restore(
                candidate, target, config, compatible_keys, saved_defaults, partial
            )
            ok = restored is not None
            if jax.process_count() > 1:  # every process must take the same path
                ok = bool(np.min(multihost_utils.process_allgather(np.int32(ok))))
            if ok:
                self._quarantine(failures, restored_step=candidate)
                return restored
            reason = reason or "restore failed on another process"
            logging.warning("Checkpoint step %d in %s cannot be restored: %s",
                            candidate, self._directory, reason)  # fmt: skip
            failures.append((candidate, reason))
        if not failures:
            return None
        raise CheckpointCorruptError(
            f"No checkpoint in {self._directory} could be restored ("
            + "; ".join(f"step {s}: {r}" for s, r in failures)
            + "). Nothing was deleted, moved or renamed. Check that the model and config match "
            "the checkpoints'; move a damaged step folder aside (rename 200 to 200.corrupt) so "
            "older steps are used, or start in a new working directory."
        )

    def _try_restore(
        self, step, target, config, compatible_keys, saved_defaults, partial
    ) -> tuple[Restored | None, str]:
        """One attempt: (restored, '') or (None, why the step cannot be restored)."""
        path = self._directory / str(step)
        if missing := [
            item for item in ("state", "data_state", "config") if not (path / item).is_dir()
        ]:
            return None, f"missing item folder(s) {missing} in {path}"
        try:
            saved = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )
        except Exception as e:  # any read failure means a damaged step
            return None, f"config unreadable: {_describe(e)}"
        if config is not None and compatible_keys:
            check_compatible(
                saved.config,
                config,
                compatible_keys,
                source=f"checkpoint at {path}",
                saved_defaults=saved_defaults,
            )
        if partial:  # only the arrays of `target`, and no data position
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            state = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
            args = {"state": state}
        else:
            args = {"state": ocp.args.StandardRestore(target), "data_state": ocp.args.JsonRestore()}
        try:
            items = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # likewise
            return None, _describe(e)
        data = None if partial else items.data_state
        data = data.encode() if isinstance(data, str) else data  # bytes were stored as text
        return Restored(step, items.state, data, saved.config), ""

    def _quarantine(self, failures: list[tuple[int, str]], restored_step: int) -> None:
        """Renames the damaged step folders newer than the restored one (process 0)."""
        if not failures:
            return
        if self._read_only:
            logging.warning("Restored step %d; the newer checkpoint(s) %s in %s are damaged (left "
                            "in place: read-only)", restored_step, [s for s, _ in failures],
                            self._directory)  # fmt: skip
            return
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        moved = []
        for step, reason in failures if jax.process_index() == 0 else []:
            src, dst = self._directory / str(step), self._directory / f"{step}.corrupt-{stamp}"
            try:
                src.rename(dst)
                moved.append(f"{src} -> {dst.name} ({reason})")
            except OSError as e:
                logging.warning("Could not move damaged checkpoint %s aside: %s", src, e)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vdm_jax_checkpoint_quarantine")
        self._manager.reload()
        if moved:
            logging.warning("Restored step %d after damaged newer checkpoint(s); moved them "
                            "aside, not deleted: %s", restored_step, "; ".join(moved))  # fmt: skip


def _prepare_directory(directory: str | os.PathLike, *, read_only: bool) -> epath.Path:
    """The checkpoint folder, created and checked for writing; UserError naming the path."""
    text = os.fspath(directory)
    if "://" in text:  # remote (gs://...): orbax/epath handle it
        return epath.Path(text)
    path = epath.Path(os.path.abspath(os.path.expanduser(text)))
    if path.exists() and not path.is_dir():
        raise UserError(f"Checkpoint directory {path} exists and is not a directory")
    try:
        if not read_only:  # os.access is not enough (root, read-only mounts): write a file
            path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"Cannot create or write checkpoint directory {path}: {e}") from e
    return path


def _has_devices(leaf: Any) -> bool:
    try:
        return len(leaf.sharding.device_set) > 0
    except (AttributeError, ValueError, NotImplementedError):  # None, or an AbstractMesh
        return False


def _json(value: Any, what: str) -> Any:
    """``value`` after a JSON round trip (bytes: their UTF-8 text), or TypeError naming it."""
    try:
        text = value.decode() if isinstance(value, bytes | bytearray) else value
        return json.loads(json.dumps(text))
    except (TypeError, ValueError) as e:  # also UnicodeDecodeError
        raise TypeError(f"Checkpointer.save: {what} cannot be stored as JSON: {e}") from e


def _describe(error: BaseException, write: bool = False) -> str:
    """One line for an orbax/tensorstore error (their messages are long); for a write, led by
    the OS error (tensorstore puts it at the end as ``[os_error_code='28']``)."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text[:300]}{' ...' if len(text) > 300 else ''}"
    code = None
    cause: BaseException | None = error
    while write and cause is not None and code is None:
        if isinstance(cause, OSError) and cause.errno:
            code = cause.errno
        elif found := re.search(r"os_error_code='?(\d+)", str(cause)):
            code = int(found[1])
        cause = cause.__cause__ or cause.__context__
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)}); {text}" if code else text
