"""Checkpoints of a training run: model state, data-iterator position and config (orbax).

A :class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager``. Each checkpoint is a
step folder ``<directory>/<step>/`` with three items:

* ``state``: the training-state pytree of ``jax.Array`` (``StandardSave``; orbax writes
  every process's shards, so it works for arrays sharded over many devices and hosts);
* ``data_state``: the input pipeline's position (``iterator.get_state()``), as JSON, one
  entry per process (identical entries, as :func:`vdm_jax.training.data.make_train_iterator` writes,
  restore on any number of processes);
* ``config``: the JSON-able config dict the run was started with.

Saving is asynchronous: :meth:`Checkpointer.save` copies the arrays to host memory and
returns while a background thread writes them; orbax writes into
``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only when everything is on disk,
so a folder named by a plain step number was complete when it was written.

Restoring is defensive, because a research run must never lose its only good checkpoint:
:meth:`Checkpointer.restore` checks the newest step and, if it is damaged (an item folder
missing, a file truncated or deleted, unreadable JSON), warns, falls back to the next older
step, and once an older step restores it renames the damaged newer step folders to
``<step>.corrupt-<UTC time>`` (a name orbax ignores) instead of deleting them. When no step
can be restored it raises :class:`CheckpointCorruptError` and changes nothing on disk.

:func:`check_compatible` compares the saved config with this run's on chosen dotted keys, and
:class:`PreemptionWatcher` turns SIGTERM into a flag the training loop polls to save and exit.

A write that fails (a full disk, a lost mount) raises :class:`CheckpointSaveError` from
:meth:`Checkpointer.save`, :meth:`Checkpointer.wait_until_finished` or
:meth:`Checkpointer.close`, whichever comes first after the background write failed. The
failed step never becomes a step folder (its ``*.orbax-checkpoint-tmp`` folder is ignored by
restore), and older checkpoints are only deleted after a newer one is complete, so the
previous checkpoints stay intact and restorable.
"""

from __future__ import annotations

import base64
import datetime
import errno
import json
import os
import re
import signal
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

__all__ = [
    "CheckpointCorruptError",
    "CheckpointSaveError",
    "Checkpointer",
    "PreemptionWatcher",
    "Restored",
    "check_compatible",
]

# Item (sub-folder) names inside each step folder.
_STATE = "state"
_DATA_STATE = "data_state"
_CONFIG = "config"
_ITEMS = (_STATE, _DATA_STATE, _CONFIG)

_DATA_STATE_FORMAT = "vdm_jax.data_state.v1"
_TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix for folders of unfinished saves
_CORRUPT_MARKER = ".corrupt-"  # our suffix for damaged step folders moved aside

_MISSING = object()


class CheckpointCorruptError(RuntimeError):
    """Checkpoints exist but none of them can be restored (damaged or unreadable).

    Raised by :meth:`Checkpointer.restore`; nothing on disk was deleted, moved or renamed.
    """


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (e.g. no space left on device).

    The message names the step, the cause and the latest complete checkpoint, which is intact.
    """


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore` returns.

    Attributes:
      step: the step of the checkpoint that was restored.
      state: the training-state pytree, with the structure, dtypes and shardings of the
        ``abstract_state`` passed to ``restore``.
      data_state: this process's data-iterator state as it was passed to ``save`` (``bytes``
        such as ``iterator.get_state()``, a ``dict``, or None). When the checkpoint was
        written by a different number of processes: the state they all had if it was the
        same, else None (a warning says so).
      config: the config dict the checkpoint was written with (JSON types: tuples come back
        as lists).
    """

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
) -> None:
    """Raises if a resumed run would change any of the given config values.

    Args:
      saved_config: the config the checkpoint was written with (``Restored.config``).
      config: this run's config, as nested dicts (e.g. ``ConfigDict.to_dict()``); anything
        indexable by ``[name]`` works.
      keys: dotted paths such as ``"model.n_embd"`` or ``"data.name"`` whose values must
        be equal for a resume to make sense. Values are compared after a JSON round trip,
        so a tuple equals the list it is saved as. A key missing from one config but not
        the other counts as a difference; missing from both counts as equal.
      source: how to name the checkpoint in the message, e.g. ``"checkpoint at /w/ckpt/200"``.

    Raises:
      TypeError: ``keys`` is a single string rather than a sequence of strings.
      ValueError: one or more keys differ; the message lists every differing key with the
        saved value and this run's value.
    """
    if isinstance(keys, str):
        raise TypeError(f"check_compatible: keys must be a sequence of dotted keys, got {keys!r}")
    diffs = []
    for key in keys:
        old, new = _lookup(saved_config, key), _lookup(config, key)
        if _canonical(old) != _canonical(new):
            diffs.append(f"{key}={_show(old)} (this run has {_show(new)})")
    if diffs:
        raise ValueError(
            f"{source} was written with {', '.join(diffs)}. These keys must match to resume: "
            "rerun with the checkpoint's values, or use a new working directory."
        )


def _lookup(config: Any, dotted_key: str) -> Any:
    node = config
    for part in dotted_key.split("."):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError, AttributeError):
            return _MISSING
    return node


def _canonical(value: Any) -> Any:
    if value is _MISSING:
        return value
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError):
        return value


def _show(value: Any) -> str:
    return "<missing>" if value is _MISSING else repr(value)


class Checkpointer:
    """Saves and restores training checkpoints in one directory (orbax ``CheckpointManager``).

    Every process of a multi-host job must create the checkpointer with the same arguments
    and call :meth:`save` and :meth:`restore` together (orbax synchronises them). Use it as a
    context manager, or call :meth:`close` so a pending asynchronous save completes.

    Example::

      with Checkpointer(workdir / "checkpoints", save_interval_steps=1000, max_to_keep=3) as ckpt:
          restored = ckpt.restore(  # None on a fresh start
              abstract_state, config=config, compatible_keys=["model.n_embd", "data.name"]
          )
          if restored is not None:
              state, start = restored.state, restored.step + 1
              train_iter.set_state(restored.data_state)
          for step in range(start, num_steps + 1):
              state = train_step(state, next(train_iter))
              ckpt.save(step, state, data_state=train_iter.get_state(), config=config)

    Args:
      directory: the checkpoint folder (created if missing; a ``gs://`` path works too).
      save_interval_steps: :meth:`save` writes when ``step % save_interval_steps == 0``,
        when forced, or at a JAX preemption sync point (multi-host).
      max_to_keep: how many of the newest checkpoints to keep (older ones are deleted after
        a newer save has completed); None keeps all. At least 2 is advisable: with 1, a
        checkpoint that turns out damaged later has no predecessor to fall back to.
      async_save: write in a background thread (``save`` returns once the arrays are
        copied to host memory); False writes before ``save`` returns.
      read_only: only restore; ``save`` raises. For evaluation or sampling from a run's
        checkpoints without any risk of changing them.

    Raises:
      ValueError: a bad interval or ``max_to_keep``; ``directory`` exists and is not a
        folder, cannot be created, or (unless ``read_only``) is not writable. The message
        names the path.
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
        if not isinstance(save_interval_steps, int | np.integer) or save_interval_steps < 1:
            raise ValueError(
                f"Checkpointer: save_interval_steps must be a positive integer, "
                f"got {save_interval_steps!r}"
            )
        if max_to_keep is not None and (
            not isinstance(max_to_keep, int | np.integer) or max_to_keep < 1
        ):
            raise ValueError(
                f"Checkpointer: max_to_keep must be a positive integer or None, got {max_to_keep!r}"
            )
        self._directory = _prepare_directory(directory, read_only=read_only)
        self._read_only = read_only
        self._save_interval_steps = int(save_interval_steps)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Exactly every `save_interval_steps` steps, plus JAX's preemption sync point.
            # (orbax's default policy would also save on the first call, whatever the step.)
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(int(save_interval_steps)),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=policies.LatestN(
                n=None if max_to_keep is None else int(max_to_keep)
            ),
            enable_async_checkpointing=async_save,
            # Never delete anything at start-up: unfinished `<step>.orbax-checkpoint-tmp`
            # folders are left alone (orbax replaces one only when it saves that step again).
            cleanup_tmp_directories=False,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self._directory, options=options)
        self._pending_step: int | None = None  # the step of the last save started

    # ----------------------------------------------------------------------------------
    # Bookkeeping.

    @property
    def directory(self) -> epath.Path:
        """The checkpoint folder."""
        return self._directory

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints in the folder, ascending.

        Includes a step whose asynchronous save is still being written by this process.
        Unfinished (``*.orbax-checkpoint-tmp``) and moved-aside (``*.corrupt-*``) folders
        are not steps.
        """
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step in :meth:`all_steps`, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def wait_until_finished(self) -> None:
        """Blocks until a pending asynchronous save is on disk.

        Raises:
          CheckpointSaveError: that save failed.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(self._pending_step, e) from e

    def close(self) -> None:
        """Waits for a pending save, then releases orbax's threads and resources.

        Raises:
          CheckpointSaveError: the pending save failed (the resources are released anyway).
        """
        try:
            self._manager.close()
        except Exception as e:
            raise self._save_failed(self._pending_step, e) from e

    def _save_failed(self, step: int | None, error: BaseException) -> CheckpointSaveError:
        """The error to raise when writing ``step`` failed with ``error``."""
        self._pending_step = None
        try:
            self._manager.reload()
            steps = [s for s in self.all_steps() if s != step]
        except Exception:  # the folder itself may be gone
            steps = []
        kept = (
            f"the checkpoints already complete are intact (latest: step {steps[-1]})"
            if steps
            else "no complete checkpoint exists yet"
        )
        what = f"the checkpoint for step {step}" if step is not None else "a checkpoint"
        return CheckpointSaveError(
            f"Could not write {what} in {self._directory}: {_describe_write_error(error)}. "
            f"Nothing was overwritten: {kept}; the unfinished write is left in a "
            f"'*{_TMP_MARKER}' folder, which restore ignores. Free space (or fix the folder) "
            "and run the same command again to resume."
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Checkpointer({str(self._directory)!r}, "
            f"save_interval_steps={self._save_interval_steps})"
        )

    # ----------------------------------------------------------------------------------
    # Saving.

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: bytes | Mapping[str, Any] | None,
        config: Mapping[str, Any],
        force: bool = False,
    ) -> bool:
        """Starts writing a checkpoint of ``state`` at ``step`` if one is due.

        A checkpoint is due when ``step % save_interval_steps == 0``, when ``force`` is True
        (e.g. after a preemption signal or at the last step), or at a JAX preemption sync
        point in a multi-host job. It is never written at or before an existing step: a
        second save of the same step, or a run that did not restore writing behind newer
        checkpoints, is skipped with a log line, so existing checkpoints are never
        overwritten. When ``max_to_keep`` is exceeded, the oldest checkpoints are deleted
        only after this one has been completely written.

        The call returns once the arrays are copied to host memory (with ``async_save``),
        so ``state`` may be donated or updated right away; a background write error is
        raised by the next ``save``, :meth:`wait_until_finished` or :meth:`close`.

        Args:
          step: the training step (the folder name).
          state: a pytree of ``jax.Array`` (e.g. a ``flax.struct.dataclass`` TrainState with
            step, params, ema_params, opt_state), possibly sharded over devices/processes.
          data_state: this process's input-pipeline position: ``bytes`` (e.g.
            ``iterator.get_state()``, JSON written with ``indent=4``: stored as JSON and
            returned byte for byte), a JSON-able ``dict``, or None. Each process's state is kept.
          config: the run's config as a JSON-able dict (e.g. ``ConfigDict.to_dict()``).
          force: save even if ``step`` is not a multiple of ``save_interval_steps``.

        Returns:
          True if a save was started, False if none was due or the step was skipped.

        Raises:
          RuntimeError: the checkpointer is read-only.
          TypeError: ``config`` or ``data_state`` cannot be stored as JSON.
        """
        if self._read_only:
            raise RuntimeError(f"Checkpointer for {self._directory} is read-only; cannot save")
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            if step == latest:
                if force:
                    logging.info(
                        "Checkpoint for step %d already exists in %s.", step, self._directory
                    )
            elif force or step % self._save_interval_steps == 0:
                logging.warning(
                    "Not saving a checkpoint at step %d in %s: it already has a newer one, "
                    "step %d (existing checkpoints are never overwritten; did the run skip "
                    "restore?).",
                    step,
                    self._directory,
                    latest,
                )
            return False
        if not force and not self._manager.should_save(step):
            return False
        config_json = _json_value(config, "config")
        if not isinstance(config_json, dict):
            raise TypeError(f"Checkpointer.save: config must be a dict, got {type(config)}")
        data_json = _encode_data_state(data_state)
        # A failure of the previous (background) save surfaces here, under its own step.
        self.wait_until_finished()
        self._pending_step = step
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardSave(state),
                        _DATA_STATE: ocp.args.JsonSave(data_json),
                        _CONFIG: ocp.args.JsonSave(config_json),
                    }
                ),
                force=True,  # the decision was made above
            )
        except Exception as e:
            raise self._save_failed(step, e) from e
        return True

    # ----------------------------------------------------------------------------------
    # Restoring.

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        compatible_keys: Sequence[str] = (),
    ) -> Restored | None:
        """Restores a checkpoint into the shapes, dtypes and shardings of ``abstract_state``.

        With ``step=None`` it tries the newest step first. A step is damaged when an item
        folder (``state``, ``data_state``, ``config``) is missing or orbax fails to read it
        (a truncated or deleted array file, a truncated ``_METADATA`` or JSON file, ...);
        then it logs a warning naming the step and the reason and tries the next older
        step. Once one restores, the damaged newer step folders are renamed to
        ``<step>.corrupt-<UTC time>`` (orbax ignores them; rename back to retry) and a
        warning names them; nothing is ever deleted. Unfinished saves
        (``<step>.orbax-checkpoint-tmp`` folders) are never candidates; a warning lists them.

        Args:
          abstract_state: the target pytree: ``jax.ShapeDtypeStruct`` leaves with
            ``.sharding`` set (e.g. ``jax.eval_shape(init)`` plus the run's shardings), or
            ``jax.Array`` leaves whose shardings are used. The arrays come back with these
            shardings, whatever devices they were saved from (8 devices -> 1, 1 -> 4, ...).
          step: a specific step to restore (no fallback: a damaged step raises), or None.
          config: this run's config, to compare with each candidate's saved config before
            its (expensive) state is read; only used with ``compatible_keys``.
          compatible_keys: dotted keys passed to :func:`check_compatible`.

        Returns:
          A :class:`Restored`, or None when the folder holds no complete checkpoint.

        Raises:
          ValueError: a leaf of ``abstract_state`` has no sharding; ``step`` does not exist;
            or the saved config differs from ``config`` on ``compatible_keys`` (from
            :func:`check_compatible`).
          CheckpointCorruptError: checkpoints exist but none can be restored, e.g. the only
            one is damaged or ``abstract_state`` does not match them; each step's reason is
            listed and nothing on disk is changed.
        """
        target = _abstract_tree(abstract_state)
        self._manager.wait_until_finished()
        self._manager.reload()
        self._warn_unfinished_saves()
        steps = self.all_steps()
        if step is not None:
            if int(step) not in steps:
                raise ValueError(
                    f"Checkpointer.restore: no checkpoint for step {step} in {self._directory}; "
                    f"steps there: {steps}"
                )
            candidates = [int(step)]
        else:
            candidates = steps[::-1]
        if not candidates:
            return None

        failures: list[tuple[int, str]] = []
        for candidate in candidates:
            restored, reason = self._try_restore(candidate, target, config, compatible_keys)
            ok = _all_processes_agree(restored is not None)
            if ok and restored is not None:
                if failures:
                    self._quarantine(failures, restored_step=candidate)
                return restored
            reason = reason or "restore failed on another process"
            logging.warning(
                "Checkpoint step %d in %s cannot be restored: %s",
                candidate,
                self._directory,
                reason,
            )
            failures.append((candidate, reason))

        listing = "; ".join(f"step {s}: {r}" for s, r in failures)
        hint = (
            "Nothing was deleted, moved or renamed. Check the folders (and that the model and "
            "config match the ones the checkpoints were written with); move a damaged step "
            "folder aside, e.g. rename 200 to 200.corrupt, so the older steps are used, or "
            "start in a new working directory."
        )
        raise CheckpointCorruptError(
            f"No checkpoint in {self._directory} could be restored ({listing}). {hint}"
        )

    def _step_path(self, step: int) -> epath.Path:
        return self._directory / str(step)

    def _try_restore(
        self,
        step: int,
        target: Any,
        config: Mapping[str, Any] | None,
        compatible_keys: Sequence[str],
    ) -> tuple[Restored | None, str | None]:
        """One attempt; returns (restored, None) or (None, why the step is damaged)."""
        path = self._step_path(step)
        missing = [item for item in _ITEMS if not (path / item).is_dir()]
        if missing:
            return None, f"missing item folder(s) {missing} in {path}"
        try:
            saved_config = self._manager.restore(
                step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
            )[_CONFIG]
        except Exception as e:  # any read failure means a damaged step
            return None, f"config unreadable: {_describe(e)}"
        if not isinstance(saved_config, dict):
            return None, f"config is not a JSON object: {saved_config!r:.100}"
        if config is not None and compatible_keys:
            check_compatible(saved_config, config, compatible_keys, source=f"checkpoint at {path}")
        try:
            items = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardRestore(target),
                        _DATA_STATE: ocp.args.JsonRestore(),
                    }
                ),
            )
            data_state = _decode_data_state(items[_DATA_STATE], step)
        except Exception as e:  # likewise
            return None, _describe(e)
        return Restored(step, items[_STATE], data_state, saved_config), None

    def _warn_unfinished_saves(self) -> None:
        try:
            names = sorted(p.name for p in self._directory.iterdir() if _TMP_MARKER in p.name)
        except OSError:
            return
        if names:
            logging.warning(
                "Ignoring unfinished checkpoint folder(s) %s in %s: saves interrupted before "
                "they completed (e.g. the job was killed while writing). They are never "
                "restored and are left in place.",
                names,
                self._directory,
            )

    def _quarantine(self, failures: list[tuple[int, str]], restored_step: int) -> None:
        """Renames damaged step folders newer than the restored one (process 0 only)."""
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        moved = []
        if jax.process_index() == 0:
            for step, reason in failures:
                src = self._step_path(step)
                dst = self._directory / f"{step}{_CORRUPT_MARKER}{stamp}"
                n = 1
                while dst.exists():
                    n += 1
                    dst = self._directory / f"{step}{_CORRUPT_MARKER}{stamp}-{n}"
                try:
                    src.rename(dst)
                    moved.append(f"{src} -> {dst.name} ({reason})")
                except OSError as e:
                    logging.warning("Could not move damaged checkpoint %s aside: %s", src, e)
        _sync_processes("vdm_jax_checkpoint_quarantine")
        self._manager.reload()
        if moved:
            logging.warning(
                "Restored step %d after damaged newer checkpoint(s); moved them aside, not "
                "deleted (orbax ignores these names; rename one back to retry it): %s",
                restored_step,
                "; ".join(moved),
            )


# --------------------------------------------------------------------------------------
# Helpers.


def _prepare_directory(directory: str | os.PathLike, *, read_only: bool) -> epath.Path:
    """Checks (and creates) the checkpoint folder; raises ValueError naming the path."""
    text = os.fspath(directory)
    if "://" in text:  # remote (gs://...): orbax/epath handle it
        return epath.Path(text)
    path = epath.Path(os.path.abspath(os.path.expanduser(text)))
    if path.exists() and not path.is_dir():
        raise ValueError(f"Checkpoint directory {path} exists and is not a directory")
    if read_only:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"Cannot create checkpoint directory {path}: {e}") from e
    # os.access is not enough (root, read-only mounts): try to create a file.
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"Checkpoint directory {path} is not writable: {e}") from e
    return path


def _abstract_tree(tree: Any) -> Any:
    """jax.Array -> ShapeDtypeStruct with its sharding; insists that every leaf has one."""
    missing = []

    def convert(path: Any, leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        if isinstance(leaf, jax.ShapeDtypeStruct) and not _has_devices(leaf.sharding):
            missing.append(jax.tree_util.keystr(path))
        return leaf

    out = jax.tree_util.tree_map_with_path(convert, tree)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ValueError(
            f"Checkpointer.restore: abstract_state leaves without a concrete sharding: {shown}. "
            "Give every leaf a sharding over real devices, e.g. jax.ShapeDtypeStruct(x.shape, "
            "x.dtype, sharding=NamedSharding(mesh, spec)), so the arrays are restored onto this "
            "run's devices (jax.eval_shape gives None, or a sharding over an AbstractMesh)."
        )
    return out


def _has_devices(sharding: Any) -> bool:
    """Whether ``sharding`` names real devices (not None, not over an AbstractMesh)."""
    if sharding is None:
        return False
    try:
        return len(sharding.device_set) > 0
    except (ValueError, AttributeError, NotImplementedError):
        return False


def _json_value(value: Any, what: str) -> Any:
    """A JSON round trip of ``value`` (tuples -> lists), or TypeError naming ``what``."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"Checkpointer.save: {what} cannot be stored as JSON: {e}") from e


def _encode_entry(data_state: Any) -> dict | None:
    if data_state is None:
        return None
    if isinstance(data_state, bytes | bytearray):
        try:
            return {"json_bytes": json.loads(bytes(data_state).decode("utf-8"))}
        except (UnicodeDecodeError, ValueError):
            return {"base64": base64.b64encode(bytes(data_state)).decode("ascii")}
    if isinstance(data_state, Mapping):
        return {"dict": _json_value(dict(data_state), "data_state")}
    raise TypeError(
        f"Checkpointer.save: data_state must be bytes, a dict or None, got {type(data_state)}"
    )


def _decode_entry(entry: Any) -> bytes | dict | None:
    if entry is None:
        return None
    if "json_bytes" in entry:
        # Iterator states are json.dumps(state, indent=4): this gives back the same bytes.
        return json.dumps(entry["json_bytes"], indent=4).encode()
    if "base64" in entry:
        return base64.b64decode(entry["base64"])
    if "dict" in entry:
        return entry["dict"]
    raise ValueError(f"unknown data_state entry {sorted(entry)}")


def _encode_data_state(data_state: Any) -> dict:
    entry = _encode_entry(data_state)
    entries = [entry] if jax.process_count() == 1 else _allgather_json(entry)
    return {"format": _DATA_STATE_FORMAT, "process_count": len(entries), "states": entries}


def _decode_data_state(saved: Any, step: int) -> bytes | dict | None:
    if not isinstance(saved, dict) or saved.get("format") != _DATA_STATE_FORMAT:
        raise ValueError(f"data_state is not in {_DATA_STATE_FORMAT} format")
    states = saved["states"]
    if len(states) != jax.process_count() and all(s == states[0] for s in states):
        # Every process was at the same position (the training iterator's state does not
        # depend on the process count), so it holds for any number of processes.
        return _decode_entry(states[0])
    if len(states) != jax.process_count():
        logging.warning(
            "Checkpoint step %d was written by %d process(es), this run has %d: the data "
            "iterator states cannot be matched to processes, so data_state is None and the "
            "input pipeline restarts from its beginning.",
            step,
            len(states),
            jax.process_count(),
        )
        return None
    return _decode_entry(states[jax.process_index()])


def _allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value``, in process order (a collective call)."""
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32)))
    buf = np.zeros(int(lengths.max()), np.uint8)
    buf[: raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(buf))
    return [
        json.loads(bytes(gathered[i, : int(lengths[i, 0])]).decode())
        for i in range(gathered.shape[0])
    ]


def _all_processes_agree(ok: bool) -> bool:
    """True only if ``ok`` is True on every process (a collective call when multi-process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.array([int(ok)], np.int32)))
    return bool(flags.min() == 1)


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _describe_write_error(error: BaseException) -> str:
    """A one-line description of a write error, leading with the OS error when there is one
    (tensorstore reports it at the end of a long message as ``[os_error_code='28']``)."""
    code = None
    seen = error
    while seen is not None and code is None:
        if isinstance(seen, OSError) and seen.errno:
            code = seen.errno
        else:
            found = re.search(r"os_error_code='?(\d+)", str(seen))
            code = int(found.group(1)) if found else None
        seen = seen.__cause__ or seen.__context__
    text = _describe(error)
    if code is None:
        return text
    name = errno.errorcode.get(code, str(code))
    return f"{os.strerror(code)} ({name}); {text}"


def _describe(error: BaseException) -> str:
    """A one-line description of a restore error (tensorstore messages are huge)."""
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:300] + " ..."
    return f"{type(error).__name__}: {text}"


# --------------------------------------------------------------------------------------
# Preemption.


def _jax_preemption_sync_available() -> bool:
    """Whether jax.distributed runs with its preemption sync manager."""
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is None or not is_initialized():
        return False
    try:
        from jax._src import distributed as jax_distributed
    except ImportError:  # pragma: no cover (private module moved)
        return False
    return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatcher:
    """Turns a preemption notice (SIGTERM) into a flag the training loop polls.

    Single process: installing it replaces the SIGTERM handler with one that only records
    the signal (the process is not killed), and :meth:`should_stop` returns True from then
    on, so the loop can save a checkpoint (``save(..., force=True)``) and exit cleanly.
    :meth:`close` (or leaving the ``with`` block) puts the previous handlers back.

    Multi-process: all processes must stop at the same step, but the signal may reach only
    some of them. When ``jax.distributed`` is initialised with its preemption service (the
    default), JAX's coordination service already catches SIGTERM in C++ and agrees on a
    step with every process; a Python handler would replace JAX's and break that, so none
    is installed and :meth:`should_stop` asks
    ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)``. Without the
    service, the Python handler is installed and :meth:`should_stop` all-gathers the flag
    (a small collective). Either way every process must call :meth:`should_stop` with the
    same steps.

    Example::

      with PreemptionWatcher() as preemption:
          for step in range(start, num_steps + 1):
              state = train_step(state, next(it))
              stop = preemption.should_stop(step)
              ckpt.save(step, state, data_state=it.get_state(), config=cfg, force=stop)
              if stop:
                  break

    Args:
      signals: the signals to catch (default SIGTERM only).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._received: int | None = None
        self._installed = False
        self._use_jax_sync = False
        self._logged = False

    def install(self) -> PreemptionWatcher:
        """Starts watching (idempotent); returns self.

        Raises:
          RuntimeError: called outside the main thread (Python only allows signal handlers
            there).
        """
        if self._installed:
            return self
        self._use_jax_sync = _jax_preemption_sync_available()
        if not self._use_jax_sync:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    "PreemptionWatcher.install() must be called from the main thread"
                )
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self._received = signum

    @property
    def received(self) -> bool:
        """Whether this process has received one of the signals since :meth:`install`."""
        return self._received is not None

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and stop at ``step`` (see the class docstring).

        Args:
          step: the current training step (the same on every process).
        """
        if self._use_jax_sync:
            from jax.experimental import multihost_utils

            stop = bool(multihost_utils.reached_preemption_sync_point(int(step)))
        elif jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.array([int(self.received)], np.int32))
            stop = bool(np.asarray(flags).max() == 1)
        else:
            stop = self.received
        if stop and not self._logged:
            self._logged = True
            logging.warning("Preemption notice received: stopping at step %d.", int(step))
        return stop

    def close(self) -> None:
        """Restores the signal handlers that were installed before (idempotent)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        self._installed = False

    def __enter__(self) -> PreemptionWatcher:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
