"""Experiments from a config: :func:`train_and_evaluate`, :func:`evaluate`, :func:`sample`,
:func:`report`.

The config's fields are those of :data:`vdm_jax.training.schema.FIELDS` (checked by
:func:`vdm_jax.training.schema.check_config`). The workdir's files are listed in
:mod:`vdm_jax.training.run_files`. Only process 0 writes metrics and images; every process
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

Random numbers: one key per run with a stream folded in for each use
(:mod:`vdm_jax.training.run_setup`); the train step folds in the step itself
(:mod:`vdm_jax.training.steps`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vdm_jax.errors import UserError
from vdm_jax.training import (
    checkpoint,
    evaluate_samples,
    parallel,
    pipeline,
    quality,
    report_render,
    run_files,
    run_setup,
    steps,
)
from vdm_jax.training.evaluate import check_eval_config, evaluate_likelihood
from vdm_jax.training.guard import GuardState, TrainingDivergedError
from vdm_jax.training.preemption import PreemptionWatcher
from vdm_jax.training.run_setup import RunSetup

__all__ = [
    "TrainingDivergedError",
    "evaluate",
    "report",
    "restore_state",
    "sample",
    "start_from_state",
    "train_and_evaluate",
]

# --------------------------------------------------------------------------- samples


def _write_samples(setup: RunSetup, params: Any, step: int, frechet: bool = False) -> str | None:
    """:func:`vdm_jax.training.quality.write_samples` of ``params`` at ``step``, with the key
    of :data:`~vdm_jax.training.run_setup.SAMPLE_STREAM` folded with the step."""
    key = jax.random.fold_in(jax.random.fold_in(setup.key, run_setup.SAMPLE_STREAM), step)
    return quality.write_samples(
        setup.config, setup.model, {"params": parallel.to_host(params)}, key, step,
        workdir=setup.workdir, info=setup.info, frechet=frechet,
    )  # fmt: skip


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


def _start(setup: RunSetup, iterator: Any) -> _Loop:
    """The loop's start: a new state or the latest checkpoint (with the data position)."""
    restored = run_setup.restore(setup, need=False)
    if restored is None:
        state = run_setup.init_state(setup)
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


def _next_batch(setup: RunSetup, iterator: Any, loop: _Loop) -> Any:
    """The next dispatch's batch on the devices (stacked over steps when k > 1)."""
    k = setup.config.training.steps_per_dispatch
    batches = loop.pending or [next(iterator) for _ in range(k)]
    loop.pending = None
    return setup.dp.put_batch(pipeline.dispatch_batch(batches, setup.use_labels), stacked=k > 1)


def _log(setup: RunSetup, loop: _Loop, metrics: Any, guard: Any, writer: Any) -> None:
    """One metrics record (the last step's values) and one progress line."""
    total = setup.config.training.num_train_steps
    host = {k: float(np.asarray(jax.device_get(v)).reshape(-1)[-1]) for k, v in metrics.items()}
    speed = ""
    start_step, start_time = loop.timer or (loop.step, time.time())
    if loop.step > start_step:
        rate = (loop.step - start_step) / max(time.time() - start_time, 1e-9)
        host["steps_per_sec"] = rate
        eta = run_files.format_seconds((total - loop.step) / max(rate, 1e-9))
        speed = f"  {rate:.2f} steps/s  ETA {eta}"
    if setup.config.training.skip_nonfinite_updates:
        host["skipped_updates"] = float(guard.skipped)
    writer.write(loop.step, host)
    # The trained objective differs from the bound only for a weighting other than the ELBO's
    # (adaptive noise levels weight both alike); then both are shown, from the same pass.
    objective = "" if setup.config.objective.weighting == "elbo" else f"  loss {host['loss']:.4f}"
    latent = f"latent {host['latent_bpd']:.4f}, " if "latent_bpd" in host else ""
    logging.info(
        "step %d/%d%s  bpd %.4f (%sprior %.4f, recon %.4f, diff %.4f)  gamma [%.2f, %.2f]%s",
        loop.step, total, objective, host["bpd"], latent, host["prior_bpd"],
        host["reconstruction_bpd"], host["diffusion_bpd"], host["gamma_0"], host["gamma_1"], speed,
    )  # fmt: skip


def _kept_checkpoint(setup: RunSetup) -> str:
    latest = setup.checkpointer.latest_step()
    if latest is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint, step {latest}, is intact in {setup.checkpointer.directory}"


def _loop(
    setup: RunSetup, iterator: Any, loop: _Loop, writer: Any, preemption: PreemptionWatcher
) -> bool:
    """Trains until ``training.num_train_steps`` or a preemption; returns whether preempted."""
    config, cfg, dp = setup.config, setup.config.training, setup.dp
    n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
    logging.info(
        "model: %d parameters; data %s %s, vocab %d; %d devices (%s)", n_params,
        config.data.name, setup.info.image_shape, setup.info.vocab_size, dp.num_shards, dp.mode,
    )  # fmt: skip
    guard, step_fn = run_setup.compile_train_step(setup)
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


def _finish(setup: RunSetup, loop: _Loop, writer: Any, start: tuple[int, float]) -> None:
    """The final evaluation (with the per-pixel baseline) and grid of samples."""
    config, split = setup.config, setup.config.eval.split
    ema_params = loop.state(setup.dp).ema_params
    results = setup.evaluate(ema_params, loop.step)
    baseline = quality.independent_baseline(config, setup.info)
    results[f"{split}/independent_pixel_baseline_bpd"] = baseline
    writer.write(loop.step, results)
    path = _write_samples(setup, ema_params, loop.step)
    elapsed = time.time() - start[1]
    logging.info(
        "done: %d steps in %s (%.2f steps/s); %s bpd %.4f (per-pixel independent baseline "
        "%.4f bpd); samples in %s", loop.step - start[0], run_files.format_seconds(elapsed),
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
    setup = run_setup.setup_run(config, workdir, "train")
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


def _train(setup: RunSetup, preemption: PreemptionWatcher) -> steps.TrainState:
    config = setup.config
    iterator = pipeline.make_train_iterator(
        setup.train_source, global_batch_size=config.training.batch_size, seed=config.seed,
        process_index=setup.data_slot, process_count=setup.data_slots,
        augment=config.data.augment,
    )  # fmt: skip
    loop = _start(setup, iterator)
    start = (loop.step, time.time())
    with run_files.MetricWriter(setup.workdir) as writer:
        run_files.write_run_config(setup.workdir, config, setup.info)
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
    make_state: Callable[[Any, Any], steps.TrainState],
) -> int:
    """Start the run ``workdir`` from a train state made elsewhere (e.g. an imported
    checkpoint) instead of a fresh initialisation.

    After the checks of a training run (config, both data splits, model, devices, a writable
    workdir), ``make_state(model, optimizer)`` (the run's model, a
    :class:`~vdm_jax.models.vdm.VDM` or :class:`~vdm_jax.models.mulan.MuLAN`, and optax
    transformation) gives the state, saved as the run's checkpoint at its ``step`` (no
    data position: training continues from the start of the data order), and
    ``config.json`` and ``data_info.json`` are written. :func:`train_and_evaluate`,
    :func:`evaluate` and :func:`sample` then continue from it. Returns the step.

    Raises:
      UserError: ``workdir`` already holds a run (nothing is written), or as
        :func:`train_and_evaluate`.
    """
    run_files.check_no_run(workdir)
    setup = run_setup.setup_run(config, workdir, "train")
    try:
        state = make_state(setup.model, setup.optimizer)
        state = jax.device_put(state, setup.dp.state_sharding(setup.abstract_state))
        step = int(jax.device_get(state.step))
        setup.checkpointer.save(step, state, data_state=None, config=config.to_dict(), force=True)
    except BaseException:
        setup.close(quiet=True)
        raise
    setup.close()  # waits for the checkpoint's write
    run_files.write_run_config(setup.workdir, config, setup.info)
    return step


# --------------------------------------------------------------------------- eval and sample


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluate the latest checkpoint's EMA parameters: one exact pass over the eval split,
    next to the per-pixel independent baseline
    (:func:`vdm_jax.training.quality.independent_baseline`). An ``eval.estimator`` other than
    ``vlb`` runs :func:`vdm_jax.training.evaluate.evaluate_likelihood` instead.

    Returns the metrics (also appended to ``workdir/metrics.jsonl``).
    """
    check_eval_config(config)
    if config.eval.estimator != "vlb":
        return evaluate_likelihood(config, workdir)
    setup = run_setup.setup_run(config, workdir, "eval")
    try:
        restored = run_setup.restore(setup, need=True)
        results = setup.evaluate(restored.state.ema_params, restored.step)
        split = config.eval.split
        baseline = quality.independent_baseline(config, setup.info)
        results[f"{split}/independent_pixel_baseline_bpd"] = baseline
        logging.info(
            "%s bpd %.4f (per-pixel independent baseline %.4f bpd)",
            split, results[f"{split}/bpd"], baseline,
        )  # fmt: skip
        with run_files.MetricWriter(setup.workdir) as writer:
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
    setup = run_setup.setup_run(config, workdir, "restore")
    try:
        return run_setup.restore(setup, need=True, step=step)
    finally:
        setup.close()


def sample(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Sample from the latest checkpoint's EMA parameters; returns the new PNG's path. For the
    digits, also reports the samples' digits Frechet distance (log and ``metrics.jsonl``
    ``frechet_digits``, :func:`vdm_jax.training.quality.frechet_key`; a small classifier's
    features, not comparable with published FID). With ``sampling.num_images`` > 0,
    :func:`vdm_jax.training.evaluate_samples.sample_images` instead (returns the .npz's path)."""
    if config.sampling.num_images:
        return evaluate_samples.sample_images(config, workdir)
    setup = run_setup.setup_run(config, workdir, "sample")
    try:
        restored = run_setup.restore(setup, need=True)
        path = _write_samples(setup, restored.state.ema_params, restored.step, frechet=True)
    finally:
        setup.close(quiet=True)
    if path:
        logging.info("wrote %s", path)
    return path


def report(
    config: ml_collections.ConfigDict, workdir: str, *, num_images: int = 512, num_bins: int = 32
) -> str:
    """Write the report of the run in ``workdir`` (:mod:`vdm_jax.training.report_render`) from its
    metrics, its latest checkpoint's EMA parameters and its sample grids; the diffusion loss
    per t uses ``num_bins`` time bins and the first ``num_images`` images of the evaluation
    split. Returns the path of ``workdir/report/index.html``.

    Raises:
      UserError: a bad config, no workdir, no checkpoint or no metrics in it, or a MuLAN run
        (``model.family='mulan'``: the report's plots are of one schedule for every pixel).
    """
    if config.model.family == "mulan":
        raise UserError(
            "--mode=report draws one schedule gamma(t) for every pixel; a MuLAN run "
            "(model.family='mulan') has none: use --mode=eval and --mode=sample"
        )
    setup = run_setup.setup_run(config, workdir, "eval")
    try:
        restored = run_setup.restore(setup, need=True)
        initial = run_setup.init_state(setup).params
    finally:
        setup.close(quiet=True)
    source = setup.eval_source
    items = [source[i] for i in range(min(len(source), num_images))]
    page = report_render.write_report(
        setup.workdir,
        model=setup.model,
        variables={"params": parallel.to_host(restored.state.ema_params)},
        initial_variables={"params": parallel.to_host(initial)},
        step=restored.step,
        images=np.stack([item["image"] for item in items]),
        labels=np.asarray([item["label"] for item in items]) if setup.use_labels else None,
        key=jax.random.fold_in(setup.key, run_setup.REPORT_STREAM),
        split=config.eval.split,
        title=f"VDM run report: {config.data.name}, {setup.workdir}",
        config_json=config.to_json(indent=2),
        num_bins=num_bins,
        batch_size=config.eval.batch_size,
    )
    logging.info("wrote the report %s", page)
    return page
