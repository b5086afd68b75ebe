"""A checkpoint of the original VDM code as an ordinary run of ours (``--mode=import``).

:func:`import_original` reads the checkpoint (:mod:`vdm_jax.pretrained`), takes the model
fields its parameter tree fixes (blocks, width, attention, Fourier features, conditioning
input, schedule) into the given config, and writes a run into a new workdir: our checkpoint
at their step holding their parameters, their EMA and their Adam moments and step count,
``config.json`` with the model fields read from the checkpoint, and ``imported.json``
(where it came from, and each model field that differs from the given config).

Later runs on that workdir (``--mode=eval``, ``--mode=sample``, training on from their step)
take the fields that fix the checkpoint from the run
(:func:`vdm_jax.training.schema.for_trained_run`; the command line does so for training when
:func:`is_imported`), and the data, evaluation, sampling and training settings from the
config given then.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath

from vdm_jax import pretrained
from vdm_jax.errors import UserError
from vdm_jax.training import run_files, sources, steps, trainer

__all__ = ["MARKER", "ImportResult", "import_original", "is_imported"]

#: The file that marks a workdir as imported (JSON: source, step, model field differences).
MARKER = "imported.json"


class ImportResult(NamedTuple):
    """What :func:`import_original` wrote.

    Attributes:
      step: the step of the checkpoint written (the original run's step).
      differences: ``{model field: (the given config's value, the checkpoint's)}`` for each
        model field the checkpoint changed.
    """

    step: int
    differences: dict[str, tuple[Any, Any]]


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _model_changes(
    config: ml_collections.ConfigDict,
    fields: Mapping[str, Any],
    explicit: Mapping[str, Any],
    what: str,
) -> dict[str, tuple[Any, Any]]:
    """``{field: (config's value, new value)}`` for the model fields that differ; an explicit
    command-line value that disagrees is an error naming the field."""
    changes = {}
    for name, value in fields.items():
        current = config.model[name]
        if isinstance(current, list | tuple):
            current, value = tuple(current), tuple(value)
        if current == value:
            continue
        if f"model.{name}" in explicit:
            raise UserError(
                f"--config.model.{name}={current!r} disagrees with {what}, which has "
                f"model.{name}={value!r}; drop the flag (the model fields come from {what})"
            )
        changes[name] = (current, value)
    return changes


def _set_model(config: ml_collections.ConfigDict, fields: Mapping[str, Any]):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for name, value in fields.items():
            config.model[name] = value
    return config


def is_imported(workdir: str) -> bool:
    """Whether ``workdir`` holds a run written by :func:`import_original`."""
    return (epath.Path(run_files.resolve(workdir)) / MARKER).exists()


def _fill_adam(node: Any, count: jax.Array, mu: Any, nu: Any) -> Any:
    """Our fresh optimizer state with their Adam moments and step count put in: every
    ScaleByAdamState gets (count, mu, nu), every other state's ``count`` (the learning-rate
    schedule's position) gets ``count``."""
    if isinstance(node, optax.ScaleByAdamState):
        return node._replace(count=count, mu=mu, nu=nu)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        values = {f: _fill_adam(getattr(node, f), count, mu, nu) for f in node._fields}
        if "count" in values:
            values["count"] = jnp.asarray(count, jnp.asarray(node.count).dtype)
        return type(node)(**values)
    if isinstance(node, tuple | list):
        return type(node)(_fill_adam(x, count, mu, nu) for x in node)
    return node


def _their_adam(original: pretrained.OriginalCheckpoint) -> Mapping[str, Any] | None:
    """Their Adam state ``{count, mu, nu}`` (optax's adamw: the first entry of the chain)."""
    state = original.opt_state
    if isinstance(state, Mapping):
        for entry in state.values():
            if isinstance(entry, Mapping) and {"count", "mu", "nu"} <= set(entry):
                return entry
    return None


def import_original(
    config: ml_collections.ConfigDict,
    workdir: str,
    source: str,
    explicit: Mapping[str, Any] | None = None,
) -> ImportResult:
    """Write the original-code checkpoint ``source`` into the new run ``workdir``.

    Args:
      config: the config the run continues with (its model fields that the checkpoint
        fixes are replaced by the checkpoint's, each difference logged by field name).
      workdir: a folder holding no run yet.
      source: the original checkpoint (see
        :func:`vdm_jax.pretrained.original.find_checkpoint_file`).
      explicit: the fields set on the command line (dotted names).

    Returns:
      :class:`ImportResult`: the step written (their step) and the model fields changed.

    Raises:
      UserError: ``workdir`` already holds a run; a bad checkpoint; a model field set on the
        command line, or the config's data (image channels), that disagrees with the
        checkpoint. Nothing is written then.
    """
    path = run_files.resolve(workdir)
    run_files.check_no_run(path)  # before reading what may be a large file
    original = pretrained.read_original_checkpoint(source)
    arch = original.architecture
    changes = _model_changes(
        config, arch.model_fields(), explicit or {}, f"the checkpoint {original.path}"
    )
    config = _set_model(config, {name: new for name, (_, new) in changes.items()})
    info = sources.dataset_info(config.data.name, data_dir=config.data.data_dir)
    if info.image_shape[-1] != arch.image_channels:
        raise UserError(
            f"the checkpoint {original.path} models {arch.image_channels}-channel images, but "
            f"the config's data ({config.data.name}) has {info.image_shape[-1]} channels "
            f"(images {tuple(info.image_shape)}); give a config with matching data"
        )

    def make_state(model, optimizer) -> steps.TrainState:
        def convert(tree, what):
            return pretrained.convert_tree(tree, model, arch.image_channels, original.path, what)

        params = convert(original.params, "params")
        opt_state = optimizer.init(params)
        adam = _their_adam(original)
        if adam is None:
            logging.warning("%s holds no Adam moments: they start at zero", original.path)
        else:
            mu, nu = convert(adam["mu"], "opt_state/mu"), convert(adam["nu"], "opt_state/nu")
            opt_state = _fill_adam(opt_state, jnp.asarray(adam["count"], jnp.int32), mu, nu)
        return steps.TrainState(
            step=jnp.asarray(original.step, jnp.int32),
            params=params,
            ema_params=convert(original.ema_params, "ema_params"),
            opt_state=opt_state,
        )

    trainer.start_from_state(config, path, make_state)
    if jax.process_index() == 0:
        record = {
            "source": str(source),
            "file": original.path,
            "step": original.step,
            "model_fields": {k: _json(v) for k, v in arch.model_fields().items()},
            "differences": {
                k: {"config": _json(a), "checkpoint": _json(b)} for k, (a, b) in changes.items()
            },
        }
        run_files.write_atomically(os.path.join(path, MARKER), json.dumps(record, indent=2))
    logging.info("imported %s at step %d into %s", original.path, original.step, path)
    return ImportResult(original.step, changes)
