"""What a run's samples are and how good: their files, their Frechet distance, a baseline.

:func:`write_samples` draws a grid with the run's sampler and names it
(:func:`sample_file_name`); where the data set has a feature extractor
(:mod:`vdm_jax.training.features`) the samples' Frechet distance is recorded under
:func:`frechet_key`. :func:`independent_baseline` is the bits/dim of the best per-pixel
independent model, the reference figure beside a run's bound.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vdm_jax.models import evaluation, mulan, ode, sampling
from vdm_jax.training import features, run_files, sources

__all__ = [
    "frechet_key",
    "independent_baseline",
    "record_frechet",
    "sample_file_name",
    "write_samples",
]


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


def write_samples(
    config: ml_collections.ConfigDict,
    model: Any,
    variables: Any,
    key: jax.Array,
    step: int,
    *,
    workdir: str,
    info: sources.DatasetInfo,
    frechet: bool = False,
) -> str | None:
    """Sample with the run's sampler and write a PNG grid under ``samples/`` (never over an
    existing file).

    Args:
      config: the run's config (its ``sampling`` fields choose the sampler, ``data.name``
        the feature extractor).
      model: the run's :class:`~vdm_jax.models.vdm.VDM`, or its
        :class:`~vdm_jax.models.mulan.MuLAN` (sampled with per-pixel alphas from the latent
        ``sampling.latent``).
      variables: ``{"params": ...}`` on the host.
      key: the samples' key.
      step: the step of ``variables``, in the file name and the metrics.
      workdir: the run's folder.
      info: the data's image shape and vocabulary.
      frechet: where the data set has a feature extractor, also log the samples' Frechet
        distance to the training split and record it in ``metrics.jsonl`` under
        :func:`frechet_key`.

    Returns:
      The grid's path on process 0, else None.
    """
    cfg = config.sampling
    shape = (cfg.num_samples, *info.image_shape)
    start = time.time()
    if isinstance(model, mulan.MuLAN):  # per-pixel alphas; the config allows no ode, no draws
        sampler = mulan.ancestral_sample if cfg.sampler == "ancestral" else mulan.ddim_sample
        drawn = sampler(model, variables, key, shape, cfg.sampling_steps, latent=cfg.latent)
    elif cfg.sampler == "ode":
        drawn = ode.ode_sample(model, variables, key, shape=shape, decode=cfg.decode)
    else:
        sampler = sampling.ancestral_sample if cfg.sampler == "ancestral" else sampling.ddim_sample
        drawn = sampler(
            model, variables, key, shape=shape, num_steps=cfg.sampling_steps, decode=cfg.decode
        )
    images = np.asarray(jax.device_get(drawn))
    logging.info("sampled %d images (%s) in %.1f s", len(images), cfg.sampler, time.time() - start)
    if jax.process_index() != 0:
        return None
    if frechet and config.data.name in features.EXTRACTORS:
        record_frechet(workdir, config.data.name, images, step)
    path = os.path.join(workdir, "samples", sample_file_name(config, step))
    return run_files.save_image_grid(images, _unused_path(path), info.vocab_size)


def frechet_key(data_name: str) -> str:
    """The metric under which the samples' Frechet distance of data set ``data_name`` is
    recorded: ``frechet_<name>`` (``frechet_digits`` for the digits)."""
    return f"frechet_{data_name}"


def record_frechet(workdir: str, data_name: str, images: np.ndarray, step: int) -> float:
    """The Frechet distance of ``images`` (integers ``[N, H, W, C]``) to the training split of
    ``data_name`` in its extractor's features (:data:`vdm_jax.training.features.EXTRACTORS`),
    logged and written to ``workdir``'s metrics at ``step`` as :func:`frechet_key` and
    ``frechet_samples`` (N); returns the distance."""
    extractor = features.EXTRACTORS[data_name](None)
    distance = extractor.distance(images)
    logging.info("step %d: %s of %d samples: %.4f", step, features.LABEL, len(images), distance)
    with run_files.MetricWriter(workdir) as writer:
        writer.write(
            step, {frechet_key(data_name): distance, "frechet_samples": float(len(images))}
        )
    return distance


def independent_baseline(config: ml_collections.ConfigDict, info: sources.DatasetInfo) -> float:
    """Bits/dim of the best per-pixel independent model fitted on the train split, on the
    evaluation split (see :func:`vdm_jax.models.evaluation.independent_pixel_bpd`)."""
    d = config.data
    train_src = sources.make_source(d.name, "train", data_dir=d.data_dir)
    test_src = sources.make_source(d.name, config.eval.split, data_dir=d.data_dir)
    limit = 20_000  # a sample is plenty for a reference figure on large data sets

    def images(src):
        return np.stack([src[i]["image"] for i in range(min(len(src), limit))])

    return evaluation.independent_pixel_bpd(images(train_src), images(test_src), info.vocab_size)
