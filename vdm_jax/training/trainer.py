"""Experiments from a config: :func:`train_and_evaluate`, :func:`evaluate`, :func:`sample`,
:func:`report`.

The config's fields are those of :data:`vdm_jax.training.schema.FIELDS` (checked by
:func:`vdm_jax.training.schema.check_config`). The workdir's files are listed in
:mod:`vdm_jax.training.workdir`. Only process 0 writes metrics and images; every process
takes part in checkpoints.

What a run guarantees (tests/test_reliability.py proves each point):

- **Bad input stops before anything is written.** The config is checked (type, range,
  unknown or missing fields, relations such as ``gamma_min < gamma_max``); then both data
  splits are opened and compared, the model is traced, the devices and batch size are
  checked and the workdir is probed for writing. Each problem raises
  :class:`~vdm_jax.errors.UserError` naming the field, file or folder; no checkpoint, metric
  or config file is created or changed.
- **Exact resume.** A run killed at any moment (SIGKILL, a crash) and restarted with the same
  command resumes from its latest complete checkpoint (state, optimizer and data position) and
  ends with bitwise the same parameters as an uninterrupted run (on the same machine).
- **Preemption.** SIGTERM makes the loop save a checkpoint at the next step and return
  normally; the next start resumes from it.
- **Damaged checkpoints.** A truncated or partly deleted latest checkpoint is skipped with a
  warning in favour of the previous good one (see :mod:`vdm_jax.training.checkpoint`).
- **Divergence.** A non-finite loss term, gradient norm or parameter stops training with
  :class:`~vdm_jax.training.guard.TrainingDivergedError` naming the first bad step and the
  terms, before anything of the diverged state is saved (:mod:`vdm_jax.training.guard`).
  ``training.skip_nonfinite_updates = N`` instead skips such updates, up to N in a row, and
  reports the count as the metric ``skipped_updates``.
- **Failed checkpoint writes** (disk full) raise
  :class:`~vdm_jax.training.checkpoint.CheckpointSaveError`; earlier checkpoints stay intact.

Random numbers: one key per run, ``jax.random.key(config.seed)``, with a stream folded in
for each use (:data:`INIT_STREAM`, :data:`EVAL_STREAM`, :data:`SAMPLE_STREAM`); the train step
folds in the step itself (:mod:`vdm_jax.training.steps`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vdm_jax.errors import UserError
from vdm_jax.models import evaluation, sampling
from vdm_jax.models.vdm import VDM
from vdm_jax.training import checkpoint, data, features, parallel, steps
from vdm_jax.training import report as report_io
from vdm_jax.training import workdir as workdir_io
from vdm_jax.training.builders import build_optimizer, model_from_config, noise_bins
from vdm_jax.training.guard import DivergenceGuard, GuardState, TrainingDivergedError
from vdm_jax.training.preemption import PreemptionWatcher
from vdm_jax.training.schema import check_config, resume_keys

__all__ = [
    "EVAL_STREAM",
    "INIT_STREAM",
    "REPORT_STREAM",
    "SAMPLE_STREAM",
    "TrainingDivergedError",
    "evaluate",
    "independent_baseline",
    "report",
    "restore_state",
    "sample",
    "sample_file_name",
    "start_from_state",
    "train_and_evaluate",
]

#: Folded into the run's key for the parameters' initialisation.
INIT_STREAM = 0x5EED
#: Folded into the run's key for evaluation; batch i then uses ``fold_in(that, i)``.
EVAL_STREAM = 0xE7A1
#: Folded into the run's key for sampling; the samples at step s use ``fold_in(that, s)``.
SAMPLE_STREAM = 0x5A3F
#: Folded into the run's key for the report's per-t diffusion loss.
REPORT_STREAM = 0x4E9


# --------------------------------------------------------------------------- the run's parts


@dataclasses.dataclass(frozen=True)
class _Setup:
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
    info: data.DatasetInfo
    train_source: Any
    eval_source: Any
    model: VDM
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
    def evaluate(self) -> _Evaluator:
        """The run's evaluator (its bound compiled once, at the first evaluation)."""
        return _Evaluator(self)

    def close(self, quiet: bool = False) -> None:
        """Waits for a pending checkpoint write; with ``quiet`` (already failing) only logs
        its error."""
        try:
            self.checkpointer.close()
        except Exception as e:
            if not quiet:
                raise
            logging.error("while stopping: %s", e)


def _check_eval_source(source: Any, info: data.DatasetInfo, split: str) -> None:
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
    model: VDM, optimizer: Any, key: jax.Array, info: data.DatasetInfo, labels: bool, bins: int
):
    """A function of no arguments making a fresh train state (for jit and eval_shape)."""
    example = jnp.zeros((1, *info.image_shape), jnp.uint8)
    example_labels = jnp.zeros((1,), jnp.int32) if labels else None
    init_key = jax.random.fold_in(key, INIT_STREAM)
    return lambda: steps.init_state(model, optimizer, init_key, example, example_labels, bins)


def _setup(config: ml_collections.ConfigDict, workdir: str, mode: str) -> _Setup:
    """Checks the config, the data, the model, the devices and the workdir, in that order,
    and creates the workdir and its checkpoint folder only once all of that passed.

    ``mode`` says which splits must be readable and what may be written: 'train' (both
    splits; writes checkpoints), 'eval' (the evaluation split), 'sample' (no split) or
    'restore' (no split, and nothing written: the workdir is only read). Only 'train' opens
    the checkpoints for writing."""
    check_config(config)
    path = workdir_io.resolve(workdir)
    if mode != "train" and not epath.Path(path).is_dir():
        raise UserError(
            f"workdir {path} does not exist: train first (--mode=train) or point "
            "--workdir at a training run"
        )
    d = config.data
    train_source = eval_source = None
    if mode == "train":
        train_source = data.make_source(d.name, "train", data_dir=d.data_dir)
        info = train_source.info
    else:
        info = data.dataset_info(d.name, data_dir=d.data_dir)
    if mode in ("train", "eval"):
        eval_source = data.make_source(d.name, config.eval.split, data_dir=d.data_dir)
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
    model = model_from_config(config, info.vocab_size)
    optimizer, lr_fn = build_optimizer(config)
    p = config.parallel
    mesh = parallel.make_mesh(p.num_devices, data=p.data, fsdp=p.fsdp)
    dp = parallel.DataParallel(p.mode, mesh, fsdp_min_size=p.fsdp_min_size)
    dp.check_batch_size(config.training.batch_size)
    data_slot, data_slots = dp.process_batch_slot()
    key = jax.random.key(config.seed)
    # Tracing the initialisation runs the model's own checks, still before any file.
    init = _init_fn(model, optimizer, key, info, config.model.num_classes > 0, noise_bins(config))
    abstract_state = jax.eval_shape(init)
    if mode != "restore":
        path = workdir_io.prepare(path)
    checkpointer = checkpoint.Checkpointer(
        os.path.join(path, "checkpoints"),
        save_interval_steps=config.training.checkpoint_every,
        max_to_keep=config.training.keep_checkpoints,
        read_only=mode != "train",
    )
    return _Setup(
        config=config, workdir=path, info=info, train_source=train_source,
        eval_source=eval_source, model=model, optimizer=optimizer, lr_fn=lr_fn, dp=dp,
        data_slot=data_slot, data_slots=data_slots, key=key, abstract_state=abstract_state,
        checkpointer=checkpointer,
    )  # fmt: skip


def _init_state(setup: _Setup) -> steps.TrainState:
    """A new state, created in place on the devices (every process computes the same)."""
    init = _init_fn(
        setup.model, setup.optimizer, setup.key, setup.info, setup.use_labels,
        noise_bins(setup.config),
    )  # fmt: skip
    return jax.jit(init, out_shardings=setup.dp.state_sharding(setup.abstract_state))()


def _restore(setup: _Setup, need: bool, step: int | None = None) -> checkpoint.Restored | None:
    """The latest checkpoint (or ``step``) laid out for this run's devices; None if there is
    none, unless ``need``."""
    shardings = setup.dp.state_sharding(setup.abstract_state)
    abstract = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        setup.abstract_state,
        shardings,
    )
    restored = setup.checkpointer.restore(
        abstract, step, config=setup.config.to_dict(), compatible_keys=resume_keys()
    )
    if restored is None and need:
        raise UserError(
            f"no checkpoint in {setup.checkpointer.directory}: train first "
            "(--mode=train) or point --workdir at a training run"
        )
    return restored


# --------------------------------------------------------------------------- evaluation, samples


class _Evaluator:
    """One exact pass over the evaluation split through
    :func:`vdm_jax.models.evaluation.evaluate_bpd`, with the bound compiled once per run for the
    run's devices (parameters as laid out for training, each batch sharded over the mesh)."""

    def __init__(self, setup: _Setup):
        self._setup = setup
        self._compiled: dict[int | None, Any] = {}

    def _bound_fn(self, timesteps: int | None, params: Any):
        dp = self._setup.dp
        if timesteps not in self._compiled:
            self._compiled[timesteps] = dp.compile_eval_step(
                parallel.make_eval_step(self._setup.model, timesteps), params=params
            )
        compiled = self._compiled[timesteps]
        return lambda p, batch, key: parallel.to_host(compiled(p, dp.put_global_batch(batch), key))

    def _batches(self, batch_size: int):
        """This process's rows of every padded global batch, with the whole batch's mask:
        global batch i holds records i * B .. i * B + B - 1 (``make_eval_iterator``), so every
        process knows the mask without asking the others."""
        s = self._setup
        batches = data.make_eval_iterator(
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


def sample_file_name(config: ml_collections.ConfigDict, step: int) -> str:
    """``step<N>_<sampler>[<steps>]_<decode>.png``: what a grid of samples was made with."""
    cfg = config.sampling
    steps_part = "" if cfg.sampler == "ode" else str(cfg.sampling_steps)
    return f"step{step:08d}_{cfg.sampler}{steps_part}_{cfg.decode}.png"


def _unused_path(path: str) -> str:
    """``path``, or ``stem-2.ext``, ``stem-3.ext``, ...: the first name not taken."""
    stem, ext = os.path.splitext(path)
    candidate, n = path, 1
    while epath.Path(candidate).exists():
        n += 1
        candidate = f"{stem}-{n}{ext}"
    return candidate


def _write_samples(setup: _Setup, params: Any, step: int, quality: bool = False) -> str | None:
    """Sample with ``params`` and write a PNG grid under ``samples/`` (never over an existing
    file); returns its path (process 0, else None). With ``quality``, where the data set has a
    feature extractor, also logs and records the samples' Frechet distance to the training
    split."""
    cfg = setup.config.sampling
    shape = (cfg.num_samples, *setup.info.image_shape)
    key = jax.random.fold_in(jax.random.fold_in(setup.key, SAMPLE_STREAM), step)
    variables = {"params": parallel.to_host(params)}
    start = time.time()
    if cfg.sampler == "ode":
        images = sampling.ode_sample(setup.model, variables, key, shape=shape, decode=cfg.decode)
    else:
        sampler = sampling.ancestral_sample if cfg.sampler == "ancestral" else sampling.ddim_sample
        images = sampler(
            setup.model, variables, key, shape=shape, num_steps=cfg.sampling_steps,
            decode=cfg.decode,
        )  # fmt: skip
    images = np.asarray(jax.device_get(images))
    logging.info("sampled %d images (%s) in %.1f s", len(images), cfg.sampler, time.time() - start)
    if jax.process_index() != 0:
        return None
    if quality and setup.config.data.name in features.EXTRACTORS:
        _report_frechet(setup, images, step)
    path = os.path.join(setup.workdir, "samples", sample_file_name(setup.config, step))
    return workdir_io.save_image_grid(images, _unused_path(path), setup.info.vocab_size)


def _report_frechet(setup: _Setup, images: np.ndarray, step: int) -> None:
    extractor = features.EXTRACTORS[setup.config.data.name](None)
    distance = extractor.distance(images)
    logging.info("step %d: %s of %d samples: %.4f", step, features.LABEL, len(images), distance)
    with workdir_io.MetricWriter(setup.workdir) as writer:
        writer.write(step, {"frechet_digits": distance, "frechet_samples": float(len(images))})


def independent_baseline(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> float:
    """Bits/dim of the best per-pixel independent model fitted on the train split, on the
    evaluation split (see :func:`vdm_jax.models.evaluation.independent_pixel_bpd`)."""
    d = config.data
    train_src = data.make_source(d.name, "train", data_dir=d.data_dir)
    test_src = data.make_source(d.name, config.eval.split, data_dir=d.data_dir)
    limit = 20_000  # a sample is plenty for a reference figure on large data sets

    def images(src):
        return np.stack([src[i]["image"] for i in range(min(len(src), limit))])

    return evaluation.independent_pixel_bpd(images(train_src), images(test_src), info.vocab_size)


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class _Loop:
    """The training loop's state between dispatches.

    Attributes:
      carry: ``(TrainState, GuardState)`` on the devices (donated to every step).
      step: the updates done (a host int, equal to the state's step).
      pending: batches already read for the next dispatch (the first one, read before any
        file was written), or None.
      timer: ``(step, time)`` at which the throughput is measured from (set after the first
        dispatch, so compilation is not counted).
    """

    carry: Any
    step: int
    pending: list | None
    timer: tuple[int, float] | None = None

    def state(self, dp: parallel.DataParallel) -> steps.TrainState:
        return dp.get_state(self.carry)[0]


def _start(setup: _Setup, iterator: Any) -> _Loop:
    """The loop's start: a new state or the latest checkpoint (with the data position)."""
    restored = _restore(setup, need=False)
    if restored is None:
        state = _init_state(setup)
        logging.info("starting a new run in %s", setup.workdir)
    else:
        state = restored.state
        if restored.data_state is not None:
            try:
                iterator.set_state(restored.data_state)
            except Exception as e:
                detail = " ".join(str(e).split())
                raise UserError(
                    f"cannot resume the input pipeline from the checkpoint at step "
                    f"{restored.step} in {setup.checkpointer.directory}: did the training data "
                    "change since it was written? Use the same data, or a new workdir. "
                    f"({type(e).__name__}: {detail})"
                ) from e
        logging.info("resumed from step %d in %s", restored.step, setup.workdir)
    step = int(jax.device_get(state.step))
    k = setup.config.training.steps_per_dispatch
    total = setup.config.training.num_train_steps
    # Read the first batches before writing anything: unreadable images fail here.
    pending = [next(iterator) for _ in range(k)] if step < total else None
    return _Loop(carry=(state, GuardState.initial()), step=step, pending=pending)


def _next_batch(setup: _Setup, iterator: Any, loop: _Loop) -> Any:
    """The next dispatch's batch on the devices (stacked over steps when k > 1)."""
    k = setup.config.training.steps_per_dispatch
    batches = loop.pending or [next(iterator) for _ in range(k)]
    loop.pending = None
    if not setup.use_labels:  # the other fields ("conditioning") stay
        batches = [{n: v for n, v in b.items() if n != "label"} for b in batches]
    batch = batches[0] if k == 1 else {n: np.stack([b[n] for b in batches]) for n in batches[0]}
    return setup.dp.put_batch(batch, stacked=k > 1)


def _log(setup: _Setup, loop: _Loop, metrics: Any, guard: Any, writer: Any) -> None:
    """One metrics record (the last step's values) and one progress line."""
    total = setup.config.training.num_train_steps
    host = {k: float(np.asarray(jax.device_get(v)).reshape(-1)[-1]) for k, v in metrics.items()}
    speed = ""
    start_step, start_time = loop.timer
    if loop.step > start_step:
        rate = (loop.step - start_step) / max(time.time() - start_time, 1e-9)
        host["steps_per_sec"] = rate
        eta = workdir_io.format_seconds((total - loop.step) / max(rate, 1e-9))
        speed = f"  {rate:.2f} steps/s  ETA {eta}"
    if setup.config.training.skip_nonfinite_updates:
        host["skipped_updates"] = float(guard.skipped)
    writer.write(loop.step, host)
    # The trained objective differs from the bound only for a weighting other than the ELBO's
    # (adaptive noise levels weight both alike); then both are shown, from the same pass.
    objective = "" if setup.config.objective.weighting == "elbo" else f"  loss {host['loss']:.4f}"
    logging.info(
        "step %d/%d%s  bpd %.4f (prior %.4f, recon %.4f, diff %.4f)  gamma [%.2f, %.2f]%s",
        loop.step, total, objective, host["bpd"], host["prior_bpd"], host["reconstruction_bpd"],
        host["diffusion_bpd"], host["gamma_0"], host["gamma_1"], speed,
    )  # fmt: skip


def _kept_checkpoint(setup: _Setup) -> str:
    latest = setup.checkpointer.latest_step()
    if latest is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint, step {latest}, is intact in {setup.checkpointer.directory}"


def _loop(
    setup: _Setup, iterator: Any, loop: _Loop, writer: Any, preemption: PreemptionWatcher
) -> bool:
    """Trains until ``training.num_train_steps`` or a preemption; returns whether preempted."""
    config, cfg, dp = setup.config, setup.config.training, setup.dp
    n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
    logging.info(
        "model: %d parameters; data %s %s, vocab %d; %d devices (%s)", n_params,
        config.data.name, setup.info.image_shape, setup.info.vocab_size, dp.num_shards, dp.mode,
    )  # fmt: skip
    guard = DivergenceGuard(cfg.skip_nonfinite_updates)
    train_step = parallel.make_train_step(
        setup.model, setup.optimizer, config.optimizer.ema_decay, setup.lr_fn,
        noise_floor=config.objective.noise_floor, noise_decay=config.objective.noise_ema_decay,
    )  # fmt: skip
    step_fn = dp.compile_train_step(
        guard.wrap(train_step), cfg.steps_per_dispatch, state=(setup.abstract_state, loop.carry[1])
    )
    loop.carry = dp.put_state(loop.carry)
    k, total = cfg.steps_per_dispatch, cfg.num_train_steps

    def due(every: int) -> bool:
        return every > 0 and (loop.step % every < k or loop.step >= total)

    # should_stop, not .received: every process must take the same decision at the same step.
    if loop.step < total and preemption.should_stop(loop.step):
        logging.warning("preempted before the first step: nothing new to save; exiting")
        return True
    while loop.step < total:
        loop.carry, metrics = step_fn(loop.carry, _next_batch(setup, iterator, loop), setup.key)
        loop.step += k
        if loop.timer is None:  # throughput is measured from here, after compilation
            jax.block_until_ready(metrics)
            loop.timer = (loop.step, time.time())
        stop = preemption.should_stop(loop.step)
        # orbax's policy decides the periodic saves; the last step and a preemption force one.
        saving = stop or loop.step >= total or setup.checkpointer.should_save(loop.step)
        logging_now = due(cfg.log_every)
        evaluating = due(cfg.eval_every) and loop.step < total
        sampling_now = due(cfg.sample_every) and loop.step < total
        if not (saving or logging_now or evaluating or sampling_now):
            continue
        # The only host round trip of a step, and only at these steps.
        guard_state = jax.device_get(dp.get_state(loop.carry)[1])
        guard.check(guard_state, _kept_checkpoint(setup))
        if logging_now:
            _log(setup, loop, metrics, guard_state, writer)
        if saving:
            setup.checkpointer.save(
                loop.step, loop.state(dp), data_state=iterator.get_state(),
                config=config.to_dict(), force=True,
            )  # fmt: skip
        if stop:
            setup.checkpointer.wait_until_finished()
            logging.warning(
                "preempted: saved a checkpoint at step %d in %s; exiting (run the same command "
                "to resume)", loop.step, setup.checkpointer.directory,
            )  # fmt: skip
            return True
        if evaluating:
            writer.write(loop.step, setup.evaluate(loop.state(dp).ema_params, loop.step))
        if sampling_now:
            _write_samples(setup, loop.state(dp).ema_params, loop.step)
    return False


def _finish(setup: _Setup, loop: _Loop, writer: Any, start: tuple[int, float]) -> None:
    """The final evaluation (with the per-pixel baseline) and grid of samples."""
    config, split = setup.config, setup.config.eval.split
    ema_params = loop.state(setup.dp).ema_params
    results = setup.evaluate(ema_params, loop.step)
    baseline = independent_baseline(config, setup.info)
    results[f"{split}/independent_pixel_baseline_bpd"] = baseline
    writer.write(loop.step, results)
    path = _write_samples(setup, ema_params, loop.step)
    elapsed = time.time() - start[1]
    logging.info(
        "done: %d steps in %s (%.2f steps/s); %s bpd %.4f (per-pixel independent baseline "
        "%.4f bpd); samples in %s", loop.step - start[0], workdir_io.format_seconds(elapsed),
        (loop.step - start[0]) / max(elapsed, 1e-9), split, results[f"{split}/bpd"], baseline,
        path,
    )  # fmt: skip


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> steps.TrainState:
    """Train (resuming from the latest checkpoint in ``workdir`` if any), evaluate, sample.

    Args:
      config: an experiment config (:mod:`vdm_jax.configs`).
      workdir: output folder; created if needed.

    Returns:
      The final :class:`~vdm_jax.training.steps.TrainState` (host arrays, no device axis); after a
      preemption (SIGTERM), the state that was saved.

    Raises:
      UserError: a bad config value, unreadable or inconsistent data, an unusable workdir,
        or a checkpoint written with an incompatible config; raised before anything is
        written.
      TrainingDivergedError: a non-finite loss, gradient or parameter (see the module doc).
      checkpoint.CheckpointCorruptError: checkpoints exist but none can be restored.
      checkpoint.CheckpointSaveError: a checkpoint could not be written (disk full).
    """
    setup = _setup(config, workdir, "train")
    # Installed early, so a SIGTERM during start-up or compilation is not fatal either.
    preemption = PreemptionWatcher().install()
    try:
        state = _train(setup, preemption)
    except BaseException:
        preemption.close()
        setup.close(quiet=True)
        raise
    setup.close()
    return state


def _train(setup: _Setup, preemption: PreemptionWatcher) -> steps.TrainState:
    config = setup.config
    iterator = data.make_train_iterator(
        setup.train_source, global_batch_size=config.training.batch_size, seed=config.seed,
        process_index=setup.data_slot, process_count=setup.data_slots,
        augment=config.data.augment,
    )  # fmt: skip
    loop = _start(setup, iterator)
    start = (loop.step, time.time())
    with workdir_io.MetricWriter(setup.workdir) as writer:
        workdir_io.write_run_config(setup.workdir, config, setup.info)
        preempted = _loop(setup, iterator, loop, writer, preemption)
        final = parallel.to_host(loop.state(setup.dp))
        setup.checkpointer.wait_until_finished()
        # From here on the checkpoint is complete: a SIGTERM may end the process at once.
        preemption.close()
        if not preempted:
            _finish(setup, loop, writer, start)
    return final


def start_from_state(
    config: ml_collections.ConfigDict,
    workdir: str,
    make_state: Callable[[VDM, Any], steps.TrainState],
) -> int:
    """Start the run ``workdir`` from a train state made elsewhere (e.g. an imported
    checkpoint) instead of a fresh initialisation.

    After the checks of a training run (config, both data splits, model, devices, a writable
    workdir), ``make_state(model, optimizer)`` (the run's :class:`~vdm_jax.models.vdm.VDM` and
    optax transformation) gives the state, saved as the run's checkpoint at its ``step`` (no
    data position: training continues from the start of the data order), and
    ``config.json`` and ``data_info.json`` are written. :func:`train_and_evaluate`,
    :func:`evaluate` and :func:`sample` then continue from it. Returns the step.

    Raises:
      UserError: ``workdir`` already holds a run (nothing is written), or as
        :func:`train_and_evaluate`.
    """
    workdir_io.check_no_run(workdir)
    setup = _setup(config, workdir, "train")
    try:
        state = make_state(setup.model, setup.optimizer)
        state = jax.device_put(state, setup.dp.state_sharding(setup.abstract_state))
        step = int(jax.device_get(state.step))
        setup.checkpointer.save(step, state, data_state=None, config=config.to_dict(), force=True)
    except BaseException:
        setup.close(quiet=True)
        raise
    setup.close()  # waits for the checkpoint's write
    workdir_io.write_run_config(setup.workdir, config, setup.info)
    return step


# --------------------------------------------------------------------------- eval and sample


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluate the latest checkpoint's EMA parameters: one exact pass over the eval split,
    next to the per-pixel independent baseline (:func:`independent_baseline`).

    Returns the metrics (also appended to ``workdir/metrics.jsonl``).
    """
    setup = _setup(config, workdir, "eval")
    try:
        restored = _restore(setup, need=True)
        results = setup.evaluate(restored.state.ema_params, restored.step)
        split = config.eval.split
        baseline = independent_baseline(config, setup.info)
        results[f"{split}/independent_pixel_baseline_bpd"] = baseline
        logging.info(
            "%s bpd %.4f (per-pixel independent baseline %.4f bpd)",
            split, results[f"{split}/bpd"], baseline,
        )  # fmt: skip
        with workdir_io.MetricWriter(setup.workdir) as writer:
            writer.write(restored.step, results)
    finally:
        setup.close(quiet=True)
    return results


def restore_state(
    config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> checkpoint.Restored:
    """A run's checkpoint (the latest, or ``step``) on this process's devices as ``config``
    lays them out; reads ``workdir`` and writes nothing.

    Returns:
      :class:`~vdm_jax.training.checkpoint.Restored`: the step, the whole
      :class:`~vdm_jax.training.steps.TrainState` (parameters, EMA, optimizer state) and the
      data position.

    Raises:
      UserError: a bad config, no workdir or no checkpoint, or a checkpoint written with a
        config that disagrees on :func:`~vdm_jax.training.schema.resume_keys`.
    """
    setup = _setup(config, workdir, "restore")
    try:
        return _restore(setup, need=True, step=step)
    finally:
        setup.close()


def sample(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Sample from the latest checkpoint's EMA parameters; returns the new PNG's path. For the
    digits, also reports the samples' digits Frechet distance (log and ``metrics.jsonl``
    ``frechet_digits``; a small classifier's features, not comparable with published FID)."""
    setup = _setup(config, workdir, "sample")
    try:
        restored = _restore(setup, need=True)
        path = _write_samples(setup, restored.state.ema_params, restored.step, quality=True)
    finally:
        setup.close(quiet=True)
    if path:
        logging.info("wrote %s", path)
    return path


def report(
    config: ml_collections.ConfigDict, workdir: str, *, num_images: int = 512, num_bins: int = 32
) -> str:
    """Write the report of the run in ``workdir`` (:mod:`vdm_jax.training.report`) from its
    metrics, its latest checkpoint's EMA parameters and its sample grids; the diffusion loss
    per t uses ``num_bins`` time bins and the first ``num_images`` images of the evaluation
    split. Returns the path of ``workdir/report/index.html``.

    Raises:
      UserError: a bad config, no workdir, no checkpoint or no metrics in it.
    """
    setup = _setup(config, workdir, "eval")
    try:
        restored = _restore(setup, need=True)
        initial = _init_state(setup).params
    finally:
        setup.close(quiet=True)
    source = setup.eval_source
    items = [source[i] for i in range(min(len(source), num_images))]
    page = report_io.write_report(
        setup.workdir,
        model=setup.model,
        variables={"params": parallel.to_host(restored.state.ema_params)},
        initial_variables={"params": parallel.to_host(initial)},
        step=restored.step,
        images=np.stack([item["image"] for item in items]),
        labels=np.asarray([item["label"] for item in items]) if setup.use_labels else None,
        key=jax.random.fold_in(setup.key, REPORT_STREAM),
        split=config.eval.split,
        title=f"VDM run report: {config.data.name}, {setup.workdir}",
        config_json=config.to_json(indent=2),
        num_bins=num_bins,
        batch_size=config.eval.batch_size,
    )
    logging.info("wrote the report %s", page)
    return page
