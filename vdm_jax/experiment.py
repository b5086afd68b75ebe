"""Experiments from a config: :func:`train_and_evaluate`, :func:`evaluate`, :func:`sample`.

This is the only module that reads a whole ml_collections config (see
``experiments/configs/base.py`` for every field). Output in ``workdir``:

- ``checkpoints/``: orbax checkpoints (state, data iterator, the config they were written with);
- ``metrics.jsonl``: one JSON object per logged step or evaluation;
- ``tensorboard/``: the same as TensorBoard event files;
- ``samples/``: PNG grids of samples.

Only process 0 writes metrics and images; every process takes part in checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vdm_jax import checkpoint, data, evaluation, parallel, sampling, train
from vdm_jax.model import VDM, make_schedule
from vdm_jax.nets import ScoreUNet

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
    )
    return VDM(
        score_net=net,
        schedule=make_schedule(m.schedule, m.gamma_min, m.gamma_max, m.schedule_features),
        vocab_size=vocab_size,
        num_steps=m.num_steps,
        antithetic_time_sampling=m.antithetic_time_sampling,
        variance_gradient=m.variance_gradient,
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
    return train.make_optimizer(**kwargs), train.learning_rate_schedule(
        o.learning_rate, o.warmup_steps, o.decay_steps, o.end_learning_rate_factor
    )


def _check_config(config: ml_collections.ConfigDict) -> None:
    t = config.training
    for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                 "steps_per_dispatch"):  # fmt: skip
        if not isinstance(t[name], int) or t[name] < 1:
            raise ValueError(f"training.{name} must be a positive integer, got {t[name]!r}")
    for name in ("eval_every", "sample_every"):
        if not isinstance(t[name], int) or t[name] < 0:
            raise ValueError(f"training.{name} must be a non-negative integer, got {t[name]!r}")
    if config.eval.batch_size < 1:
        raise ValueError(f"eval.batch_size must be positive, got {config.eval.batch_size}")
    if config.sampling.sampler not in ("ancestral", "ddim", "ode"):
        raise ValueError(
            "sampling.sampler must be 'ancestral', 'ddim' or 'ode', got "
            f"{config.sampling.sampler!r}"
        )


def _prepare_workdir(workdir: str) -> str:
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir} exists and is not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create workdir {workdir}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ValueError(f"workdir {workdir} is not writable")
    return workdir


class MetricWriter:
    """metrics.jsonl and TensorBoard event files in ``workdir``; writes on process 0 only."""

    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self._active:
            from tensorboardX import SummaryWriter  # imported lazily: slow import

            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


def _stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _host_metrics(metrics: Any) -> dict[str, float]:
    """Device metrics (possibly with device or step axes) to floats: the last step's values."""
    return {k: float(np.asarray(jax.device_get(v)).reshape(-1)[-1]) for k, v in metrics.items()}


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    bad = [k for k, v in metrics.items() if k != "lr" and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"training diverged at step {step}: non-finite "
            + ", ".join(f"{k}={metrics[k]}" for k in bad)
            + "; the last good checkpoint is kept"
        )


# --------------------------------------------------------------------------- setup shared by modes


class _Run:
    """Everything the three modes share: data info, model, parallel layout, checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        _check_config(config)
        self.config = config
        self.workdir = _prepare_workdir(workdir)
        self.info = data.dataset_info(config.data.name, data_dir=config.data.data_dir)
        self.model = build_model(config, self.info.vocab_size)
        self.optimizer, self.lr_fn = build_optimizer(config)
        self.dp = parallel.DataParallel(
            config.parallel.mode, parallel.make_mesh(config.parallel.num_devices)
        )
        self.dp.check_batch_size(config.training.batch_size)
        self.num_dims = math.prod(self.info.image_shape)
        self.checkpointer = checkpoint.Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            save_interval_steps=config.training.checkpoint_every,
            max_to_keep=config.training.keep_checkpoints,
        )
        self.use_labels = config.model.num_classes > 0
        self.key = jax.random.key(config.seed)

    def init_state(self) -> train.TrainState:
        example = jnp.zeros((1, *self.info.image_shape), jnp.uint8)
        labels = jnp.zeros((1,), jnp.int32) if self.use_labels else None
        init = jax.jit(lambda k: train.init_state(self.model, self.optimizer, k, example, labels))
        return init(jax.random.fold_in(self.key, 0x5EED))

    def restore(self, need: bool) -> checkpoint.Restored | None:
        abstract = jax.eval_shape(self.init_state)
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.dp.replicated),
            abstract,
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

    def evaluate(self, params: Any, step: int) -> dict[str, float]:
        """One exact pass over the evaluation split with ``params``; bits/dim metrics."""
        cfg = self.config.eval
        source = data.make_source(
            self.config.data.name, cfg.split, data_dir=self.config.data.data_dir
        )
        batch_size = cfg.batch_size + (-cfg.batch_size) % self.dp.num_shards
        params = self.dp.put_params(params)
        results = {}
        for name, num_steps in (("", None), (f"T{cfg.discrete_steps}_", cfg.discrete_steps)):
            if num_steps == 0:
                continue
            fn = self.dp.compile_eval_step(parallel.make_eval_step(self.model, num_steps))
            acc = evaluation.BpdAccumulator()
            batches = data.make_eval_iterator(source, global_batch_size=batch_size)
            for i, batch in enumerate(batches):
                mask = batch.pop("mask")
                if not self.use_labels:
                    batch.pop("label", None)
                key = jax.random.fold_in(jax.random.fold_in(self.key, 0xE7A1), i)
                terms = fn(params, self.dp.put_global_batch(batch), key)
                acc.add(parallel.to_host(terms), _global_mask(mask))
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
        variables = {"params": jax.device_get(params)}
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


def _global_mask(mask: np.ndarray) -> np.ndarray:
    """Every process's eval masks, concatenated in process order (the global batch order)."""
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(mask, tiled=True))


# --------------------------------------------------------------------------- the three modes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train.TrainState:
    """Train (resuming from the latest checkpoint in ``workdir`` if any), evaluate, sample.

    Args:
      config: an experiment config (``experiments/configs``).
      workdir: output folder; created if needed.

    Returns:
      The final :class:`~vdm_jax.train.TrainState` (host arrays, no device axis).
    """
    run = _Run(config, workdir)
    cfg = config.training
    writer = MetricWriter(run.workdir)
    source = data.make_source(config.data.name, "train", data_dir=config.data.data_dir)
    iterator = data.make_train_iterator(source, global_batch_size=cfg.batch_size, seed=config.seed)
    restored = run.restore(need=False)
    if restored is None:
        state = run.init_state()
        logging.info("starting a new run in %s", run.workdir)
    else:
        state = restored.state
        if restored.data_state is not None:
            iterator.set_state(restored.data_state)
        logging.info("resumed from step %d in %s", restored.step, run.workdir)
    if jax.process_index() == 0:
        with open(os.path.join(run.workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "model: %d parameters; data %s %s, vocab %d; %d devices (%s)", n_params,
        config.data.name, run.info.image_shape, run.info.vocab_size, run.dp.num_shards,
        run.dp.mode,
    )  # fmt: skip
    step_fn = run.dp.compile_train_step(
        parallel.make_train_step(run.model, run.optimizer, config.optimizer.ema_decay, run.lr_fn),
        cfg.steps_per_dispatch,
    )
    device_state = run.dp.put_state(state)
    del state
    step = int(jax.device_get(run.dp.get_state(device_state).step))
    k = cfg.steps_per_dispatch
    start_step, start_time, metrics = step, time.time(), None

    def due(every: int) -> bool:
        return every > 0 and (step % every < k or step >= cfg.num_steps)

    with checkpoint.PreemptionWatcher() as preemption:
        while step < cfg.num_steps:
            batches = [next(iterator) for _ in range(k)]
            batch = batches[0] if k == 1 else _stack(batches)
            if not run.use_labels:
                batch = {"image": batch["image"]}
            device_state, metrics = step_fn(
                device_state, run.dp.put_batch(batch, stacked=k > 1), run.key
            )
            step += k
            stop = preemption.should_stop(step)
            saving = due(cfg.checkpoint_every) or stop
            if due(cfg.log_every) or saving:
                host = _host_metrics(metrics)
                _check_finite(step, host)
            if due(cfg.log_every):
                elapsed = time.time() - start_time
                rate = (step - start_step) / max(elapsed, 1e-9)
                eta = (cfg.num_steps - step) / max(rate, 1e-9)
                host["steps_per_sec"] = rate
                writer.write(step, host)
                logging.info(
                    "step %d/%d  bpd %.4f (prior %.4f, recon %.4f, diff %.4f)  gamma [%.2f, %.2f]"
                    "  %.2f steps/s  ETA %s", step, cfg.num_steps, host["bpd"], host["prior_bpd"],
                    host["reconstruction_bpd"], host["diffusion_bpd"], host["gamma_0"],
                    host["gamma_1"], rate, _format_seconds(eta),
                )  # fmt: skip
            if saving:
                run.checkpointer.save(
                    step, run.dp.get_state(device_state), data_state=iterator.get_state(),
                    config=config.to_dict(), force=True,
                )  # fmt: skip
            if stop:
                run.checkpointer.wait_until_finished()
                logging.warning("preempted: saved a checkpoint at step %d; exiting", step)
                break
            if due(cfg.eval_every) and step < cfg.num_steps:
                ema = run.dp.get_state(device_state).ema_params
                writer.write(step, run.evaluate(ema, step))
            if due(cfg.sample_every) and step < cfg.num_steps:
                run.write_samples(run.dp.get_state(device_state).ema_params, step)

    final = jax.device_get(run.dp.get_state(device_state))
    run.checkpointer.wait_until_finished()
    if step >= cfg.num_steps and not preemption.received:
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
    writer.close()
    run.checkpointer.close()
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
    run = _Run(config, workdir)
    restored = run.restore(need=True)
    results = run.evaluate(restored.state.ema_params, restored.step)
    writer = MetricWriter(run.workdir)
    writer.write(restored.step, results)
    writer.close()
    run.checkpointer.close()
    return results


def sample(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Sample from the latest checkpoint's EMA parameters; returns the PNG's path."""
    run = _Run(config, workdir)
    restored = run.restore(need=True)
    path = run.write_samples(restored.state.ema_params, restored.step)
    run.checkpointer.close()
    if path:
        logging.info("wrote %s", path)
    return path


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
