"""A checkpoint of the original VDM code, or of MuLAN's code (the same layout), as an ordinary
run of ours (``--mode=import``).

:func:`import_original` reads the checkpoint (:mod:`vdm_jax.pretrained`), takes the model
fields its parameter tree fixes (blocks, width, attention, Fourier features, conditioning
input, schedule; for MuLAN ``model.family='mulan'``, the latent's kind and size, the
encoder's blocks and width and the schedule's width) into the given config, and writes a run
into a new workdir: our checkpoint at their step holding their parameters, their EMA and
their Adam moments and step count (MuLAN's two masked AdamW states merged into our one),
``config.json`` with the model fields read from the checkpoint, and ``imported.json``
(where it came from, each model field that differs from the given config, and for MuLAN the
fields the tree does not record, taken from the config: ``model.parameterization``,
``model.latent_k``).

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
    """Write the original-code or MuLAN checkpoint ``source`` into the new run ``workdir``.

    Args:
      config: the config the run continues with (its model fields that the checkpoint
        fixes are replaced by the checkpoint's, each difference logged by field name).
      workdir: a folder holding no run yet.
      source: the checkpoint (see :func:`vdm_jax.pretrained.original.find_checkpoint_file`);
        a tree with an ``encoder_model`` is MuLAN's
        (:func:`vdm_jax.pretrained.mulan.is_mulan_state`).
      explicit: the fields set on the command line (dotted names).

    Returns:
      :class:`ImportResult`: the step written (their step) and the model fields changed.

    Raises:
      UserError: ``workdir`` already holds a run; a bad checkpoint; a model field set on the
        command line, or the config's data (image channels; for MuLAN the image shape), that
        disagrees with the checkpoint; for MuLAN, a config field with no meaning for it
        (:func:`vdm_jax.training.schema.check_config`). Nothing is written then.
    """
    explicit = explicit or {}
    path = run_files.resolve(workdir)
    run_files.check_no_run(path)  # before reading what may be a large file
    file, state = pretrained.read_train_state(source)
    if pretrained.is_mulan_state(state):
        return _import_mulan(
            config, path, source, pretrained.mulan_checkpoint(file, state), explicit
        )
    original = pretrained.original_checkpoint(file, state)
    arch = original.architecture
    changes = _model_changes(
        config, arch.model_fields(), explicit, f"the checkpoint {original.path}"
    )
    config = _set_model(config, {name: new for name, (_, new) in changes.items()})
    info = sources.dataset_info(config.data.name, data_dir=config.data.data_dir)
    if info.image_shape[-1] != arch.image_channels:
        raise UserError(
            f"the checkpoint {original.path} models {arch.image_channels}-channel images, but "
            f"the config's data ({config.data.name}) has {info.image_shape[-1]} channels "
            f"(images {tuple(info.image_shape)}); give a config with matching data"
        )

    def convert(model, tree, what):
        return pretrained.convert_tree(tree, model, arch.image_channels, original.path, what)

    make_state = _state_maker(
        convert, original.path, original.step, original.params, original.ema_params,
        _their_adam(original),
    )  # fmt: skip
    trainer.start_from_state(config, path, make_state)
    _write_marker(path, source, original.path, original.step, arch.model_fields(), changes)
    logging.info("imported %s at step %d into %s", original.path, original.step, path)
    return ImportResult(original.step, changes)


def _state_maker(convert, file, step, params, ema_params, adam):
    """The ``make_state(model, optimizer)`` that :func:`trainer.start_from_state` calls, for a
    checkpoint's trees: ``convert(model, tree, what)`` turns one of them into ours; ``adam`` is
    ``{"count", "mu", "nu"}`` of their Adam state, or None (the moments then start at zero)."""

    def make_state(model, optimizer) -> steps.TrainState:
        ours = convert(model, params, "params")
        opt_state = optimizer.init(ours)
        if adam is None:
            logging.warning("%s holds no Adam moments: they start at zero", file)
        else:
            mu, nu = (convert(model, adam[k], f"opt_state/{k}") for k in ("mu", "nu"))
            opt_state = _fill_adam(opt_state, jnp.asarray(adam["count"], jnp.int32), mu, nu)
        return steps.TrainState(
            step=jnp.asarray(step, jnp.int32),
            params=ours,
            ema_params=convert(model, ema_params, "ema_params"),
            opt_state=opt_state,
        )

    return make_state


def _write_marker(path, source, file, step, fields, changes, **extra) -> None:
    """``imported.json`` (process 0 only)."""
    if jax.process_index() != 0:
        return
    record = {
        "source": str(source),
        "file": file,
        "step": step,
        "model_fields": {k: _json(v) for k, v in fields.items()},
        "differences": {
            k: {"config": _json(a), "checkpoint": _json(b)} for k, (a, b) in changes.items()
        },
        **extra,
    }
    run_files.write_atomically(os.path.join(path, MARKER), json.dumps(record, indent=2))


def _import_mulan(
    config: ml_collections.ConfigDict,
    path: str,
    source: str,
    checkpoint: pretrained.MuLANCheckpoint,
    explicit: Mapping[str, Any],
) -> ImportResult:
    """:func:`import_original` of a MuLAN checkpoint."""
    arch = checkpoint.architecture
    fields = arch.model_fields()
    changes = _model_changes(config, fields, explicit, f"the checkpoint {checkpoint.path}")
    config = _set_model(config, {name: new for name, (_, new) in changes.items()})
    info = sources.dataset_info(config.data.name, data_dir=config.data.data_dir)
    if tuple(info.image_shape) != tuple(arch.image_shape):
        raise UserError(
            f"the checkpoint {checkpoint.path} is MuLAN's for images of shape "
            f"{tuple(arch.image_shape)} (one schedule per pixel), but the config's data "
            f"({config.data.name}) has images {tuple(info.image_shape)}; give a config with "
            "matching data"
        )
    # Not in the tree: their velocity model is v, their epsilon model eps; k is their config's.
    assumed = {"parameterization": config.model.parameterization}
    if arch.latent_kind == "topk":
        assumed["latent_k"] = config.model.latent_k
    logging.warning(
        "%s does not record %s: taken from the config (their model_mulan_velocity is "
        "parameterization 'v', model_mulan_epsilon 'eps'); set them with --config.model.* if "
        "the checkpoint was trained otherwise",
        checkpoint.path, ", ".join(f"model.{k}={v!r}" for k, v in assumed.items()),
    )  # fmt: skip

    def convert(model, tree, what):
        return pretrained.convert_mulan_tree(tree, model, arch, checkpoint.path, what)

    make_state = _state_maker(
        convert, checkpoint.path, checkpoint.step, checkpoint.params, checkpoint.ema_params,
        checkpoint.adam,
    )  # fmt: skip
    trainer.start_from_state(config, path, make_state)
    _write_marker(
        path, source, checkpoint.path, checkpoint.step, fields, changes,
        assumed={f"model.{k}": v for k, v in assumed.items()},
    )  # fmt: skip
    logging.info("imported %s (MuLAN) at step %d into %s", checkpoint.path, checkpoint.step, path)
    return ImportResult(checkpoint.step, changes)
