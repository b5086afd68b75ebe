"""``--mode=sample`` of many images (``sampling.num_images``, e.g. 50,000 for FID-50k) into one
``.npz`` that Frechet distance tools read, on all devices, resumable.

What it writes, beside the usual grid, in ``WORKDIR/samples/`` (``STEM`` is
:func:`~vdm_jax.training.quality.sample_file_name`'s name without ``.png``, then
``_n<N>_<hash>``, the hash of every setting the images depend on)::

    STEM.npz     arr_0: uint8 [N, H, W, C], pixel values 0..255 (round(x * 255 / (V - 1)) of
                 the model's 0..V-1; unchanged for V = 256), image i in row i
    STEM.json    the sampler and its settings, N, the checkpoint step, the seed, the model's
                 fields, the devices, how the pixels were scaled
    STEM.png     a grid of the first sampling.num_samples images
    NAME_<hash>.parts/  per-batch images while sampling (removed once STEM.npz is written;
                 the hash adds the device count: a stopped pass resumes on as many devices)

``arr_0`` is the layout of the reference batches of OpenAI's guided-diffusion evaluator
(``evaluations/evaluator.py``, TensorFlow: ``python evaluator.py REF.npz STEM.npz``), which
reads ``arr_0`` of both files and wants RGB ``[N, H, W, 3]``: repeat a grey channel first.
pytorch-fid and clean-fid read folders of image files (pytorch-fid's ``.npz`` arguments are
precomputed statistics, ``mu`` and ``sigma``, not images): write each row as a PNG first
(docs/running.rst shows how).

Image i is drawn with the key ``fold_in(fold_in(fold_in(run key, SAMPLE_STREAM), step), i)``
(:func:`vdm_jax.models.likelihood.example_keys`). Every device samples
``sampling.device_batch_size`` = b images at a time (a batch of D b images over D devices,
sharded as training shards its batches), device d of batch k the images (k D + d) b ..
(k D + d + 1) b - 1, the last ones past N included and dropped: every group of b images is
computed by the same program in the same lanes whatever D, so the images are the same to
the bit for any device count, any N, and after a stop and resume (the finished batches are
kept in the ``.parts`` folder, :class:`~vdm_jax.training.evaluate_store.BatchStore`, and the
same command computes only the missing ones). Another b may round differently (a pixel at a
decoder's tie can change), so b is one of the settings. An ``.npz`` already written with the
same settings is reported, not sampled again, unless ``sampling.recompute=True``.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import PartitionSpec

from vdm_jax.errors import UserError
from vdm_jax.models import likelihood, ode, sampling
from vdm_jax.training import features, parallel, quality, run_files, run_setup
from vdm_jax.training.evaluate_store import (
    BatchStore,
    Progress,
    npz_bytes,
    run_batches,
    store_stem,
)
from vdm_jax.training.schema import check_config, flatten

__all__ = ["SAMPLERS", "sample_images", "sampler_settings", "to_uint8"]

#: The samplers of ``sampling.sampler``.
SAMPLERS = {
    "ancestral": sampling.ancestral_sample,
    "ddim": sampling.ddim_sample,
    "ode": ode.ode_sample,
}
_ODE_SETTINGS = ("rtol", "atol", "max_steps", "solver")


def sampler_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The sampler of ``config.sampling`` and every setting it samples with: ``sampler``,
    ``decode``, and ``num_steps`` (ancestral, ddim) or the ODE solve's ``rtol``, ``atol``,
    ``max_steps`` and ``solver`` (the defaults of :func:`vdm_jax.models.ode.ode_sample`)."""
    cfg = config.sampling
    settings: dict[str, Any] = {"sampler": cfg.sampler, "decode": cfg.decode}
    if cfg.sampler == "ode":
        parameters = inspect.signature(ode.ode_sample).parameters
        settings.update({k: parameters[k].default for k in _ODE_SETTINGS})
    else:
        settings["num_steps"] = cfg.sampling_steps
    return settings


def to_uint8(images: np.ndarray, vocab_size: int) -> np.ndarray:
    """Integer images in 0..V-1 as uint8 0..255: ``round(x * 255 / (V - 1))`` (as the PNG
    grids scale them; the identity for V = 256)."""
    scaled = np.round(np.asarray(images, np.float64) * 255.0 / (vocab_size - 1))
    return scaled.astype(np.uint8)


def sample_images(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None
) -> str | None:
    """``sampling.num_images`` images of the latest checkpoint's EMA parameters in one ``.npz``
    (see the module doc); on the digits also their Frechet distance (``frechet_digits`` in
    ``metrics.jsonl``, :func:`vdm_jax.training.quality.record_frechet`).

    Args:
      config: the run's config (its ``sampling`` fields: sampler, N, batch, recompute).
      workdir: the trained run.
      stop_after: sample at most this many batches, then return None if some are missing
        (what a kill does, without the kill): the same call again continues.

    Returns:
      The ``.npz``'s path, or None when stopped by ``stop_after``.

    Raises:
      UserError: a bad config, ``sampling.num_images`` = 0, no run or checkpoint.
    """
    check_config(config)
    if config.sampling.num_images < 1:
        raise UserError("sampling.num_images must be > 0 to write an .npz of samples")
    setup = run_setup.setup_run(config, workdir, "sample")
    try:
        restored = run_setup.restore(setup, need=True)
        return _sample(setup, restored.state.ema_params, restored.step, stop_after)
    finally:
        setup.close(quiet=True)


def _sample(setup: run_setup.RunSetup, ema_params: Any, step: int, stop_after: int | None):
    config, dp, info = setup.config, setup.dp, setup.info
    cfg = config.sampling
    num_images = cfg.num_images
    if info.vocab_size > 256:
        raise UserError(f"{info.vocab_size} pixel values do not fit in uint8 images")
    batch_size = cfg.device_batch_size * dp.num_shards
    settings = sampler_settings(config)
    identity = {
        "kind": "samples", **settings, "num_images": num_images,
        "device_batch_size": cfg.device_batch_size,
        "step": step, "seed": config.seed, "data": config.data.name,
        "image_shape": info.image_shape, "vocab_size": info.vocab_size,
        "model": flatten(config.model.to_dict(), "model."),
    }  # fmt: skip
    recorded = {
        "num_devices": dp.num_shards, "parallel_mode": dp.mode,
        "platform": jax.devices()[0].platform, "jax": jax.__version__,
    }  # fmt: skip
    name = quality.sample_file_name(config, step).removesuffix(".png") + f"_n{num_images}"
    folder = os.path.join(setup.workdir, "samples")
    final = os.path.join(folder, store_stem(name, identity) + ".npz")
    writer = jax.process_index() == 0
    if cfg.recompute and writer:
        for suffix in (".npz", ".json", ".png"):
            path = epath.Path(final.removesuffix(".npz") + suffix)
            if path.exists():
                path.unlink()
    elif epath.Path(final).exists():
        logging.info("%d samples with these settings are already in %s (sampling.recompute="
                     "True samples them again)", num_images, final)  # fmt: skip
        return final
    # A batch holds D b images: its parts resume on as many devices (another D starts anew).
    parts = {**identity, "num_devices": dp.num_shards}
    store = BatchStore(folder, name, parts, recorded, recompute=cfg.recompute, suffix=".parts")
    logging.info(
        "sampling %d images (%s) in batches of %d over %d devices into %s%s", num_images,
        settings, batch_size, dp.num_shards, final,
        f" (resuming: {len(store.resumed)} batches done)" if store.resumed else "",
    )  # fmt: skip
    params = dp.put_params(ema_params)
    sampler = {k: v for k, v in settings.items() if k != "sampler"}
    fn, model, shape = SAMPLERS[cfg.sampler], setup.model, (1, *info.image_shape)

    def device_fn(params, batch, key):
        def one(key_i):
            return fn(model, {"params": params}, key_i, shape=shape, **sampler)[0]

        return jax.vmap(one)(likelihood.example_keys(key, batch["index"]))

    # Every device runs the same program on sampling.device_batch_size images (shard_map, not
    # a program partitioned by the compiler, whose arithmetic varies with the device count),
    # and device d of batch k holds images (kD + d) b .. (kD + d + 1) b - 1, padding included:
    # the same groups of b images, in the same lanes, whatever the device count D.
    spec = dp.batch_sharding.spec
    per_device = jax.shard_map(
        device_fn, mesh=dp.mesh, in_specs=(PartitionSpec(), spec, PartitionSpec()),
        out_specs=spec, check_vma=False,
    )  # fmt: skip
    compiled = dp.compile_eval_step(per_device, params=params)
    key = jax.random.fold_in(jax.random.fold_in(setup.key, run_setup.SAMPLE_STREAM), step)
    rows = batch_size // setup.data_slots

    def compute(index: int, _: Any) -> dict[str, np.ndarray]:
        first = index * batch_size + setup.data_slot * rows
        local = {"index": np.arange(first, first + rows, dtype=np.int32)}
        images = parallel.to_host(compiled(params, dp.put_global_batch(local), key))
        everything = np.arange(index * batch_size, (index + 1) * batch_size)
        keep = everything < num_images
        return {"index": everything[keep], "images": images[keep].astype(np.uint8)}

    num_batches = -(-num_images // batch_size)
    progress = Progress(f"sample {cfg.sampler}", num_batches, num_images, "images")
    results = run_batches(store, range(num_batches), compute, progress, batch_items=batch_size,
                          stop_after=stop_after)  # fmt: skip
    if results is None:
        logging.info("stopped after %d new batches; the same command continues", stop_after)
        return None
    images = np.concatenate([results[i]["images"] for i in sorted(results)])
    if writer:
        _write(setup, step, final, images, {**identity, "recorded": recorded})
    store.remove()
    logging.info("wrote %d samples to %s", num_images, final)
    return final


def _write(setup: run_setup.RunSetup, step: int, final: str, images, settings: dict) -> None:
    """The description, the grid and the Frechet distance, then the ``.npz`` (last: its
    presence says that the pass is finished)."""
    config, info = setup.config, setup.info
    stem = final.removesuffix(".npz")
    description = {
        "file": os.path.basename(final), "key": "arr_0", "shape": list(images.shape),
        "dtype": "uint8", "pixels": f"round(x * 255 / {info.vocab_size - 1}) of the model's "
        f"values x in 0..{info.vocab_size - 1}", "settings": settings,
    }  # fmt: skip
    run_files.write_atomically(stem + ".json", json.dumps(description, indent=2, default=str))
    run_files.save_image_grid(images[: config.sampling.num_samples], stem + ".png",
                              info.vocab_size)  # fmt: skip
    if config.data.name in features.EXTRACTORS:
        quality.record_frechet(setup.workdir, config.data.name, images, step)
    run_files.write_bytes_atomically(final, npz_bytes({"arr_0": to_uint8(images, info.vocab_size)}))
