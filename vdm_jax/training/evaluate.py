"""``--mode=eval`` with any likelihood estimator: one exact pass over the evaluation split on
all devices, resumable, each figure with its standard error.

``eval.estimator`` names the estimator (:data:`vdm_jax.models.likelihood.ESTIMATORS`):
``vlb`` (the default) is the run's own evaluation, :func:`vdm_jax.training.trainer.evaluate`
(one noise level per image, the keys ``SPLIT/bpd``...); ``dense_vlb``, ``discrete``, ``ode``
and ``ode_iw`` run here, with ``eval.num_draws`` = K draws per image, and write the keys of
:meth:`~vdm_jax.models.likelihood.LikelihoodResult.as_dict` under ``SPLIT/``
(``test/ode_iw_bpd``, ``test/ode_iw_bpd_stderr``, ``test/ode_iw_spread_bpd``,
``test/ode_iw_nfe``, ``test/ode_iw_num_examples``, the terms ``test/ode_iw_<term>_bpd``) and
``SPLIT/<estimator>_num_draws``.

How the pass is run:

- **Devices.** Each global batch of ``eval.batch_size`` (rounded up to a multiple of the
  devices) is sharded over every device of every process, as training shards its batches
  (:meth:`~vdm_jax.training.parallel.DataParallel.compile_eval_step`); example i draws its
  random numbers from ``fold_in(key, i)``, so the figure is the one device's up to float
  rounding (per-device batches of another size round differently); with ``ode`` and
  ``ode_iw`` each device solves its own rows one at a time, and the figure is the one
  device's to the bit.
- **Resume.** Each finished batch's per-example values (the estimate in nats and bits/dim,
  the K draws, the spread, the network evaluations, the terms; ``index`` and ``mask``) are
  written atomically to ``WORKDIR/eval/<split>_<estimator>_K<K>_step<step>_<hash>/
  batch_NNNNNN.npz`` (:class:`~vdm_jax.training.evaluate_store.BatchStore`), the folder named
  after the hash of everything the values depend on (estimator, K and its options, split,
  examples, batch size, checkpoint step, seed, data set, model fields; listed in its
  ``settings.json``). The same command, after a kill, computes only the missing batches and
  reports bitwise the figure of an uninterrupted pass (on the same machine and device
  count). Other settings get another folder: partial results never mix.
- **Finished passes** write ``result.json`` beside the batches; the same command then reports
  it from disk without computing or appending to ``metrics.jsonl`` again.
  ``eval.recompute=True`` removes that folder's results and computes them anew (each time it
  is given: drop it to resume).

The ``+-`` of the printed figure is its standard error: the sample standard deviation of the
per-example estimates over the square root of the number of examples, which includes the
estimator's own noise (each example's noise levels, z_0 draws and Hutchinson probes).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, overload

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import PartitionSpec

from vdm_jax.errors import UserError
from vdm_jax.models import likelihood
from vdm_jax.training import parallel, pipeline, run_files, run_setup
from vdm_jax.training.evaluate_store import BatchStore, Progress, run_batches
from vdm_jax.training.schema import check_config, flatten

__all__ = ["check_eval_config", "estimator_options", "evaluate_likelihood"]


def check_eval_config(config: ml_collections.ConfigDict) -> None:
    """Checks the config (:func:`~vdm_jax.training.schema.check_config`) and the evaluation
    fields together with the model's; touches no file and no device.

    Raises:
      UserError: a field out of range (e.g. ``eval.num_draws`` < 1, an unknown
        ``eval.estimator``); ``vlb`` with K > 1 or ``eval.num_examples``; an estimator that
        needs continuous time (``dense_vlb``, ``ode``, ``ode_iw``) on a discrete-time model
        (``model.timesteps`` > 0); ``discrete`` without T, or for MuLAN.
    """
    check_config(config)
    cfg, steps = config.eval, config.model.timesteps
    name = cfg.estimator
    if name == "vlb":
        if cfg.num_draws != 1:
            raise UserError(
                f"eval.estimator='vlb' draws one noise level per image, got eval.num_draws="
                f"{cfg.num_draws}; use eval.estimator='dense_vlb' for K > 1 levels per image"
            )
        if cfg.num_examples:
            raise UserError(
                "eval.estimator='vlb' evaluates the whole split, got eval.num_examples="
                f"{cfg.num_examples}; use another estimator, or eval.num_examples=0"
            )
        return
    if likelihood.get_estimator(name).continuous_time and steps:
        raise UserError(
            f"eval.estimator={name!r} needs a continuous-time model, but this one is "
            f"discrete-time (model.timesteps={steps}); use eval.estimator='discrete' (its "
            f"bound at T={steps}) or 'vlb'"
        )
    if name == "discrete" and config.model.family == "mulan":
        raise UserError(
            "eval.estimator='discrete' has no MuLAN model to bound (model.family='mulan'): "
            "MuLAN's per-pixel schedule gamma(t, c) is trained and evaluated in continuous "
            "time only; use eval.estimator='dense_vlb' (its continuous bound, K levels per image)"
        )
    if name == "discrete" and not (cfg.discrete_timesteps or steps):
        raise UserError(
            "eval.estimator='discrete' needs T for a continuous-time model: set "
            "eval.discrete_timesteps (e.g. 1000)"
        )


def estimator_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The estimator's own settings from the config: T of ``discrete``
    (``eval.discrete_timesteps``, else ``model.timesteps``); the ODE solve's tolerances and
    Hutchinson probes per draw of ``ode`` and ``ode_iw`` (``eval.ode_rtol``, ``eval.ode_atol``,
    ``eval.num_probes``); none for the others."""
    cfg = config.eval
    if cfg.estimator == "discrete":
        return {"num_steps": cfg.discrete_timesteps or config.model.timesteps}
    if cfg.estimator in ("ode", "ode_iw"):
        return {"rtol": cfg.ode_rtol, "atol": cfg.ode_atol, "num_probes": cfg.num_probes}
    return {}


class _FirstRecords:
    """The first ``n`` records of a source (``eval.num_examples``)."""

    def __init__(self, source: Any, n: int):
        self.source, self.n, self.info = source, n, source.info

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]


@overload
def evaluate_likelihood(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after: None = None
) -> dict[str, float]: ...


@overload
def evaluate_likelihood(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None
) -> dict[str, float] | None: ...


def evaluate_likelihood(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None
) -> dict[str, float] | None:
    """The estimator ``eval.estimator`` over the evaluation split with the latest checkpoint's
    EMA parameters (see the module doc), its metrics appended to ``workdir/metrics.jsonl``.

    Args:
      config: the run's config (its ``eval`` fields choose the estimator and its settings).
      workdir: the trained run.
      stop_after: compute at most this many batches, then return None if the pass is not
        finished (what a kill does, without the kill): the same call again continues.

    Returns:
      The metrics (``SPLIT/<estimator>_bpd``, ...), or None when stopped by ``stop_after``.

    Raises:
      UserError: as :func:`check_eval_config`; no run or checkpoint in ``workdir``;
        ``eval.num_examples`` beyond the split.
    """
    check_eval_config(config)
    if config.eval.estimator == "vlb":
        raise UserError("eval.estimator='vlb' is the run's own evaluation: trainer.evaluate")
    setup = run_setup.setup_run(config, workdir, "eval")
    try:
        restored = run_setup.restore(setup, need=True)
        return _evaluate(setup, restored.state.ema_params, restored.step, stop_after)
    finally:
        setup.close(quiet=True)


def _store(setup: run_setup.RunSetup, step: int, num_examples: int, batch_size: int):
    config = setup.config
    cfg = config.eval
    identity = {
        "kind": "likelihood", "estimator": cfg.estimator, "num_draws": cfg.num_draws,
        "options": estimator_options(config), "split": cfg.split,
        "num_examples": num_examples, "batch_size": batch_size, "step": step,
        "seed": config.seed, "data": config.data.name, "image_shape": setup.info.image_shape,
        "vocab_size": setup.info.vocab_size,
        "model": flatten(config.model.to_dict(), "model."),
    }  # fmt: skip
    recorded = {
        "num_devices": setup.dp.num_shards, "parallel_mode": setup.dp.mode,
        "platform": jax.devices()[0].platform, "jax": jax.__version__,
    }  # fmt: skip
    name = f"{cfg.split}_{cfg.estimator}_K{cfg.num_draws}_step{step:08d}"
    parent = os.path.join(setup.workdir, "eval")
    return BatchStore(parent, name, identity, recorded, recompute=cfg.recompute)


def _evaluate(setup: run_setup.RunSetup, ema_params: Any, step: int, stop_after: int | None):
    config, dp = setup.config, setup.dp
    cfg = config.eval
    name, num_draws, split = cfg.estimator, cfg.num_draws, cfg.split
    source = setup.eval_source
    if cfg.num_examples > len(source):
        raise UserError(
            f"eval.num_examples={cfg.num_examples} is more than the {len(source)} examples of "
            f"the {split!r} split; use at most {len(source)}, or 0 for all"
        )
    num_examples = cfg.num_examples or len(source)
    batch_size = cfg.batch_size + (-cfg.batch_size) % dp.num_shards
    store = _store(setup, step, num_examples, batch_size)
    done = epath.Path(store.folder) / "result.json"
    if done.exists():
        metrics = json.loads(done.read_text())["metrics"]
        _log_result(name, split, step, metrics, f"finished earlier, read from {store.folder}; "
                    "eval.recompute=True computes it again")  # fmt: skip
        return metrics
    logging.info(
        "evaluating %s (K=%d) on %d %s examples in batches of %d over %d devices, into %s%s",
        name, num_draws, num_examples, split, batch_size, dp.num_shards, store.folder,
        f" (resuming: {len(store.resumed)} batches done)" if store.resumed else "",
    )  # fmt: skip
    params = dp.put_params(ema_params)
    options, model = estimator_options(config), setup.model
    key = jax.random.fold_in(setup.key, run_setup.EVAL_STREAM)

    def batch_fn(params, batch, key):
        fields = {k: v for k, v in batch.items() if k != "index"}
        return likelihood.estimate(
            name, model, {"params": params}, fields, key, num_draws=num_draws,
            indices=batch["index"], **options,
        )  # fmt: skip

    if name in ("ode", "ode_iw"):
        # Each device solves its own rows one after the other (shard_map), as one device
        # solves a batch: the same program per row, so the same steps to the bit. The
        # partitioner is not left to split a loop (lax.map) over a sharded batch axis.
        spec = dp.batch_sharding.spec
        batch_fn = jax.shard_map(batch_fn, mesh=dp.mesh, in_specs=(PartitionSpec(), spec,
                                 PartitionSpec()), out_specs=spec, check_vma=False)  # fmt: skip
    compiled = dp.compile_eval_step(batch_fn, params=params)
    rows = batch_size // setup.data_slots

    def compute(index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = index * batch_size + setup.data_slot * rows
        local = {"image": batch["image"], "index": np.arange(first, first + rows, dtype=np.int32)}
        if setup.use_labels:
            local["label"] = batch["label"]
        est = parallel.to_host(compiled(params, dp.put_global_batch(local), key))
        everything = np.arange(index * batch_size, (index + 1) * batch_size)
        arrays = {"index": everything, "mask": everything < num_examples}
        arrays.update({k: getattr(est, k) for k in ("nats", "bpd", "draws", "spread", "nfe")})
        arrays.update({"term_" + k: v for k, v in est.terms.items()})
        return arrays

    subset = _FirstRecords(source, num_examples) if num_examples < len(source) else source
    batches = pipeline.make_eval_iterator(
        subset, global_batch_size=batch_size, process_index=setup.data_slot,
        process_count=setup.data_slots,
    )  # fmt: skip
    num_batches = pipeline.num_eval_batches(num_examples, global_batch_size=batch_size)
    progress = Progress(f"eval {name} K={num_draws}", num_batches, num_examples, "examples")
    results = run_batches(store, batches, compute, progress, batch_items=batch_size,
                          stop_after=stop_after)  # fmt: skip
    if results is None:
        logging.info("stopped after %d new batches; the same command continues", stop_after)
        return None
    metrics = _metrics(name, num_draws, split, results, int(np.prod(setup.info.image_shape)))
    with run_files.MetricWriter(setup.workdir) as writer:
        writer.write(step, metrics)
    if jax.process_index() == 0:
        run_files.write_atomically(str(done), json.dumps({"step": step, "metrics": metrics}))
    _log_result(name, split, step, metrics, f"per-example values in {store.folder}")
    return metrics


def _metrics(name: str, num_draws: int, split: str, results: dict, num_dims: int) -> dict:
    """The pass's figures from every batch's arrays, added in batch order (so a resumed pass
    adds the same numbers in the same order as an uninterrupted one)."""
    acc = likelihood.Accumulator(name, num_draws)
    for index in sorted(results):
        a = results[index]
        terms = {k[len("term_") :]: v for k, v in a.items() if k.startswith("term_")}
        est = likelihood.Estimate(a["nats"], a["bpd"], a["draws"], a["spread"], a["nfe"], terms)
        acc.add(est, a["mask"])
    out = acc.result(num_dims).as_dict(prefix=f"{split}/")
    out[f"{split}/{name}_num_draws"] = num_draws
    # The per-image spread of K = 1 draw is undefined (NaN): left out of the metrics.
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def _log_result(name: str, split: str, step: int, metrics: dict, where: str) -> None:
    head = f"{split}/{name}_"
    spread = metrics.get(head + "spread_bpd")
    logging.info(
        "step %d: %s %s bpd %.4f +- %.4f (standard error) over %d examples, K=%d draws per "
        "image%s, %.1f network evaluations per image (%s)", step, split, name,
        metrics[head + "bpd"], metrics[head + "bpd_stderr"], int(metrics[head + "num_examples"]),
        int(metrics[head + "num_draws"]),
        "" if spread is None else f" (per-image spread {spread:.4f} bpd)", metrics[head + "nfe"],
        where,
    )  # fmt: skip
