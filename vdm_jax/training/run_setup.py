"""What every mode of a run builds from its config before it writes anything, and the run's
random streams.

:func:`setup_run` checks the config, opens and compares the data splits, builds the model and
optimizer, the devices' layout and the checkpointer, and probes the workdir (a
:class:`RunSetup`); :func:`init_state` and :func:`restore` give its train state, and
:class:`Evaluator` its bound over one exact pass of the evaluation split. The trainer
(:mod:`vdm_jax.training.trainer`) runs the modes on them.

Random numbers: one key per run, ``jax.random.key(config.seed)``, with a stream folded in
for each use (:data:`INIT_STREAM`, :data:`EVAL_STREAM`, :data:`SAMPLE_STREAM`,
:data:`REPORT_STREAM`); the train step folds in the step itself
(:mod:`vdm_jax.training.steps`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vdm_jax.errors import UserError
from vdm_jax.models import evaluation
from vdm_jax.models.mulan import MuLAN
from vdm_jax.models.vdm import VDM
from vdm_jax.training import checkpoint, parallel, pipeline, run_files, sources, steps
from vdm_jax.training.builders import build_optimizer, model_from_config, noise_bins
from vdm_jax.training.guard import DivergenceGuard, GuardState
from vdm_jax.training.schema import base_config, check_config, resume_keys

__all__ = [
    "EVAL_STREAM",
    "INIT_STREAM",
    "REPORT_STREAM",
    "SAMPLE_STREAM",
    "Evaluator",
    "RunSetup",
    "compile_train_step",
    "init_state",
    "restore",
    "setup_run",
]

#: Folded into the run's key for the parameters' initialisation.
INIT_STREAM = 0x5EED
#: Folded into the run's key for evaluation; batch i then uses ``fold_in(that, i)``.
EVAL_STREAM = 0xE7A1
#: Folded into the run's key for sampling; the samples at step s use ``fold_in(that, s)``.
SAMPLE_STREAM = 0x5A3F
#: Folded into the run's key for the report's per-t diffusion loss.
REPORT_STREAM = 0x4E9


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What every mode builds from a checked config, before it writes anything.

    Attributes:
      config: the checked config.
      workdir: the run's folder (created and proved writable).
      info: the data's image shape, vocabulary and classes.
      train_source, eval_source: the opened splits (None where the mode needs none).
      model: the VDM.
      optimizer, lr_fn: the optax transformation and its learning-rate schedule.
      dp: devices and compilation (jit over a mesh, or pmap).
      data_slot, data_slots: this process's block of every global batch, of how many.
      key: the run's key.
      abstract_state: shapes and dtypes of the train state.
      checkpointer: the checkpoints of ``workdir``.
    """

    config: ml_collections.ConfigDict
    workdir: str
    info: sources.DatasetInfo
    train_source: Any
    eval_source: Any
    model: VDM | MuLAN
    optimizer: Any
    lr_fn: Any
    dp: parallel.DataParallel
    data_slot: int
    data_slots: int
    key: jax.Array
    abstract_state: steps.TrainState
    checkpointer: checkpoint.Checkpointer

    @property
    def use_labels(self) -> bool:
        return self.config.model.num_classes > 0

    @functools.cached_property
    def evaluate(self) -> Evaluator:
        """The run's evaluator (its bound compiled once, at the first evaluation)."""
        return Evaluator(self)

    def close(self, quiet: bool = False) -> None:
        """Waits for a pending checkpoint write; with ``quiet`` (already failing) only logs
        its error."""
        try:
            self.checkpointer.close()
        except Exception as e:
            if not quiet:
                raise
            logging.error("while stopping: %s", e)


def _check_eval_source(source: Any, info: sources.DatasetInfo, split: str) -> None:
    """The evaluation split must look like the training split (shape and vocabulary)."""
    other = source.info
    if tuple(other.image_shape) != tuple(info.image_shape):
        raise UserError(
            f"data: the {split!r} split's images have shape {tuple(other.image_shape)} but the "
            f"training split's have {tuple(info.image_shape)}; both splits must match"
        )
    if other.vocab_size != info.vocab_size:
        raise UserError(
            f"data: the {split!r} split has {other.vocab_size} pixel values, the training "
            f"split {info.vocab_size}"
        )


def _init_fn(
    model: VDM | MuLAN,
    optimizer: Any,
    key: jax.Array,
    info: sources.DatasetInfo,
    labels: bool,
    bins: int,
):
    """A function of no arguments making a fresh train state (for jit)."""
    example = jnp.zeros((1, *info.image_shape), jnp.uint8)
    example_labels = jnp.zeros((1,), jnp.int32) if labels else None
    init_key = jax.random.fold_in(key, INIT_STREAM)
    return lambda: steps.init_state(model, optimizer, init_key, example, example_labels, bins)


def setup_run(config: ml_collections.ConfigDict, workdir: str, mode: str) -> RunSetup:
    """Checks the config, the data, the model, the devices and the workdir, in that order,
    and creates the workdir and its checkpoint folder only once all of that passed.

    ``mode`` says which splits must be readable and what may be written: 'train' (both
    splits; writes checkpoints), 'eval' (the evaluation split), 'sample' (no split) or
    'restore' (no split, and nothing written: the workdir is only read). Only 'train' opens
    the checkpoints for writing."""
    check_config(config)
    path = run_files.resolve(workdir)
    if mode != "train" and not epath.Path(path).is_dir():
        raise UserError(
            f"workdir {path} does not exist: train first (--mode=train) or point "
            "--workdir at a training run"
        )
    d = config.data
    train_source = eval_source = None
    if mode == "train":
        train_source = sources.make_source(d.name, "train", data_dir=d.data_dir)
        info = train_source.info
    else:
        info = sources.dataset_info(d.name, data_dir=d.data_dir)
    if mode in ("train", "eval"):
        eval_source = sources.make_source(d.name, config.eval.split, data_dir=d.data_dir)
        _check_eval_source(eval_source, info, config.eval.split)
    if 0 < config.model.num_classes < info.num_classes:
        raise UserError(
            f"model.num_classes={config.model.num_classes} is smaller than the data's "
            f"{info.num_classes} classes (labels 0..{info.num_classes - 1}); use "
            f"{info.num_classes}, or 0 for an unconditional model"
        )
    height, width = info.image_shape[:2]
    if config.data.augment and height != width:
        raise UserError(
            f"data.augment=True rotates images by 90 degrees, but the data's are {height}x"
            f"{width}; use square images or data.augment=False"
        )
    model = model_from_config(config, info.vocab_size, info.image_shape)
    optimizer, lr_fn = build_optimizer(config)
    p = config.parallel
    mesh = parallel.make_mesh(p.num_devices, data=p.data, fsdp=p.fsdp)
    dp = parallel.DataParallel(p.mode, mesh, fsdp_min_size=p.fsdp_min_size)
    dp.check_batch_size(config.training.batch_size)
    data_slot, data_slots = dp.process_batch_slot()
    key = jax.random.key(config.seed)
    # Tracing the initialisation runs the model's own checks, still before any file (once per
    # model definition in a process: param_shapes keeps its result).
    params = steps.param_shapes(model, info.image_shape, config.model.num_classes > 0)
    abstract_state = jax.eval_shape(
        functools.partial(
            steps.state_from_params, optimizer=optimizer, noise_bins=noise_bins(config)
        ),
        params,
    )
    if mode != "restore":
        path = run_files.prepare(path)
    checkpointer = checkpoint.Checkpointer(
        os.path.join(path, "checkpoints"),
        save_interval_steps=config.training.checkpoint_every,
        max_to_keep=config.training.keep_checkpoints,
        read_only=mode != "train",
    )
    return RunSetup(
        config=config, workdir=path, info=info, train_source=train_source,
        eval_source=eval_source, model=model, optimizer=optimizer, lr_fn=lr_fn, dp=dp,
        data_slot=data_slot, data_slots=data_slots, key=key, abstract_state=abstract_state,
        checkpointer=checkpointer,
    )  # fmt: skip


def init_state(setup: RunSetup) -> steps.TrainState:
    """A new state, created in place on the devices (every process computes the same)."""
    init = _init_fn(
        setup.model, setup.optimizer, setup.key, setup.info, setup.use_labels,
        noise_bins(setup.config),
    )  # fmt: skip
    return jax.jit(init, out_shardings=setup.dp.state_sharding(setup.abstract_state))()


def compile_train_step(setup: RunSetup) -> tuple[DivergenceGuard, Any]:
    """The run's train step as the trainer dispatches it:
    :func:`~vdm_jax.training.steps.train_step` with the run's model, optimizer and objective,
    watched by a :class:`~vdm_jax.training.guard.DivergenceGuard`
    (``training.skip_nonfinite_updates``), compiled for the run's devices with
    ``training.steps_per_dispatch`` steps per call.

    Returns:
      ``(guard, step)``: ``step(carry, batch, key) -> (carry, metrics)`` with ``carry =
      (TrainState, GuardState)`` laid out by ``setup.dp.put_state`` (donated), ``batch`` by
      ``setup.dp.put_batch`` and the run's key; ``guard.check`` reads a host copy of the
      carry's :class:`~vdm_jax.training.guard.GuardState`.
    """
    config = setup.config
    guard = DivergenceGuard(config.training.skip_nonfinite_updates)
    train_step = steps.make_train_step(
        setup.model, setup.optimizer, config.optimizer.ema_decay, setup.lr_fn,
        noise_floor=config.objective.noise_floor, noise_decay=config.objective.noise_ema_decay,
    )  # fmt: skip
    step = setup.dp.compile_train_step(
        guard.wrap(train_step),
        config.training.steps_per_dispatch,
        state=(setup.abstract_state, GuardState.initial()),
    )
    return guard, step


@overload
def restore(
    setup: RunSetup, need: Literal[True], step: int | None = None
) -> checkpoint.Restored: ...


@overload
def restore(setup: RunSetup, need: bool, step: int | None = None) -> checkpoint.Restored | None: ...


def restore(setup: RunSetup, need: bool, step: int | None = None) -> checkpoint.Restored | None:
    """The latest checkpoint (or ``step``) laid out for this run's devices; None if there is
    none, unless ``need``."""
    shardings = setup.dp.state_sharding(setup.abstract_state)
    abstract = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        setup.abstract_state,
        shardings,
    )
    restored = setup.checkpointer.restore(
        abstract,
        step,
        config=setup.config.to_dict(),
        compatible_keys=resume_keys(),
        saved_defaults=base_config().to_dict(),  # fields added since an older run was saved
    )
    if restored is None and need:
        raise UserError(
            f"no checkpoint in {setup.checkpointer.directory}: train first "
            "(--mode=train) or point --workdir at a training run"
        )
    return restored


class Evaluator:
    """One exact pass over the evaluation split through
    :func:`vdm_jax.models.evaluation.evaluate_bpd`, with the bound compiled once per run for the
    run's devices (parameters as laid out for training, each batch sharded over the mesh)."""

    def __init__(self, setup: RunSetup):
        self._setup = setup
        self._compiled: dict[int | None, Any] = {}

    def _bound_fn(self, timesteps: int | None, params: Any):
        dp = self._setup.dp
        if timesteps not in self._compiled:
            self._compiled[timesteps] = dp.compile_eval_step(
                steps.make_eval_step(self._setup.model, timesteps), params=params
            )
        compiled = self._compiled[timesteps]
        return lambda p, batch, key: parallel.to_host(compiled(p, dp.put_global_batch(batch), key))

    def _batches(self, batch_size: int):
        """This process's rows of every padded global batch, with the whole batch's mask:
        global batch i holds records i * B .. i * B + B - 1 (``make_eval_iterator``), so every
        process knows the mask without asking the others."""
        s = self._setup
        batches = pipeline.make_eval_iterator(
            s.eval_source, global_batch_size=batch_size, process_index=s.data_slot,
            process_count=s.data_slots,
        )  # fmt: skip
        for i, batch in enumerate(batches):
            batch = dict(batch)
            batch["mask"] = np.arange(i * batch_size, (i + 1) * batch_size) < len(s.eval_source)
            yield batch

    def __call__(self, params: Any, step: int) -> dict[str, float]:
        """Bits/dim metrics of ``params`` (a device tree of the run's layout) at ``step``."""
        s = self._setup
        cfg = s.config.eval
        batch_size = cfg.batch_size + (-cfg.batch_size) % s.dp.num_shards
        params = s.dp.put_params(params)
        key = jax.random.fold_in(s.key, EVAL_STREAM)
        results = {}
        T = cfg.discrete_timesteps
        for prefix, timesteps in ((f"{cfg.split}/", None), (f"{cfg.split}/T{T}_", T)):
            if timesteps == 0:
                continue
            result = evaluation.evaluate_bpd(
                s.model, params, self._batches(batch_size), key, num_steps=timesteps,
                use_labels=s.use_labels, bound_fn=self._bound_fn(timesteps, params),
            )  # fmt: skip
            results.update(result.as_dict(prefix=prefix))
        logging.info(
            "step %d: %s bpd %.4f +- %.4f (standard error) over %d examples", step, cfg.split,
            results[f"{cfg.split}/bpd"], results[f"{cfg.split}/bpd_stderr"],
            int(results[f"{cfg.split}/num_examples"]),
        )  # fmt: skip
        return results
