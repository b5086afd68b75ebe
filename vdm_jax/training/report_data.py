"""What the run report shows, computed: the records of ``metrics.jsonl`` and the diffusion
loss per time bin of a model over a set of images (:func:`diffusion_loss_by_time`).

In continuous time the expected diffusion loss depends only on the schedule's endpoints (the
paper's invariance to the noise schedule), so the learned schedule and the linear one with the
same endpoints integrate to the same figure; what a learned schedule changes is the variance
of the one-sample estimator. :mod:`vdm_jax.training.report_render` draws these figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.errors import UserError
from vdm_jax.maths import diffusion, losses, schedules

__all__ = ["LossByTime", "diffusion_loss_by_time", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl`` file, in file order.

    Each record is a dict with an int ``'step'`` and float metrics: train records carry
    ``'bpd'``, ``'prior_bpd'``, ``'reconstruction_bpd'``, ``'diffusion_bpd'`` (bits/dim),
    ``'gamma_0'``, ``'gamma_1'``, ``'grad_norm'`` and ``'lr'``; evaluation records carry the
    same terms prefixed with the split (``'test/bpd'``, ``'test/bpd_stderr'``, ...). A partial
    last line (a run killed while writing it) is skipped.

    Raises:
      UserError: the file does not exist, or a line other than the last is not JSON.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(
            f"no metrics file at {path}: train first (--mode=train) or point --workdir at a "
            "training run"
        )
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # written while the run was killed
            raise UserError(
                f"{path}, line {i + 1}, is not a JSON record ({e}): {line[:80]}"
            ) from None
    return records


@dataclasses.dataclass(frozen=True)
class LossByTime:
    """The continuous-time diffusion loss at fixed times, over a set of images.

    Attributes:
      t: the time bins' midpoints, ``[K]``.
      mean: the loss's mean over the images at each t, ``[K]``, bits/dim.
      variance: its variance over the images (one noise draw per image), ``[K]``,
        (bits/dim)^2.
      num_images: how many images each t was evaluated on.
    """

    t: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    num_images: int

    @property
    def expected(self) -> float:
        """The midpoint rule for E_t[loss]: the diffusion term of the bound, bits/dim."""
        return float(np.mean(self.mean))

    @property
    def estimator_std(self) -> float:
        """The standard deviation, bits/dim, of the one-sample estimator of the diffusion term
        (t ~ U(0, 1) and one noise draw per image): sqrt(E_t[E[L^2]] - E_t[E[L]]^2)."""
        second_moment = np.mean(self.variance + np.square(self.mean))
        return float(np.sqrt(max(second_moment - self.expected**2, 0.0)))


def _loss_at(model, variables, images, labels, t, key, first, linear):
    """Per-example diffusion loss, nats ``[B]``, at the scalar time t; image ``first + i``
    draws its noise from ``fold_in(key, first + i)``, whatever the batching. ``linear`` (a
    traced bool, so both schedules share one compiled function) picks the linear schedule with
    the model's endpoints."""
    x = diffusion.encode(images, model.vocab_size)
    batch = x.shape[0]
    gamma_t, dgamma_dt = schedules.gamma_and_derivative(
        lambda s: model.apply(variables, s, method=model.gamma), t
    )
    gamma_0, gamma_1 = model.apply(variables, method=model.endpoints)
    gamma_t = jnp.where(linear, gamma_0 + (gamma_1 - gamma_0) * t, gamma_t)
    dgamma_dt = jnp.where(linear, gamma_1 - gamma_0, dgamma_dt)
    gamma_t = jnp.broadcast_to(gamma_t, (batch,))
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), x.shape[1:]))(
        first + jnp.arange(batch)
    )
    z_t = diffusion.q_sample(x, gamma_t, eps)
    eps_hat = model.apply(variables, z_t, gamma_t, labels, method=model.predict_noise)
    return losses.diffusion_loss_continuous(eps, eps_hat, jnp.broadcast_to(dgamma_dt, (batch,)))


_loss_at_jit = jax.jit(_loss_at, static_argnames=("model",))


def diffusion_loss_by_time(
    model: Any,
    variables: Any,
    images: np.ndarray,
    key: jax.Array,
    *,
    labels: np.ndarray | None = None,
    num_bins: int = 32,
    linear: bool = False,
    batch_size: int = 256,
    progress: Any = None,
) -> LossByTime:
    """The diffusion loss 1/2 gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2 of continuous time at
    the midpoints of ``num_bins`` equal time bins, for every image.

    Args:
      model: a :class:`~vdm_jax.models.vdm.VDM`.
      variables: the model's variables, ``{'params': ...}``.
      images: integer images ``[N, H, W, C]``, values in 0..V-1.
      key: the noise: image i in bin k uses ``fold_in(fold_in(key, k), i)``, so the result
        does not depend on ``batch_size`` and a call with ``linear=True`` and the same key sees
        the same noise.
      labels: int ``[N]`` labels for a class-conditional model, or None.
      num_bins: K, the number of time bins.
      linear: use the linear schedule with the model's endpoints instead of its own.
      batch_size: images per compiled call.
      progress: a ``tqdm`` progress bar to advance by one per batch, or None.

    Returns:
      :class:`LossByTime` in bits/dim.
    """
    images = np.asarray(images)
    n = len(images)
    if n == 0 or num_bins < 1:
        raise UserError(f"need images and num_bins >= 1, got {n} images, num_bins={num_bins}")
    num_dims = math.prod(images.shape[1:])
    t = (np.arange(num_bins) + 0.5) / num_bins
    sums = np.zeros((2, num_bins))
    for k in range(num_bins):
        bin_key = jax.random.fold_in(key, k)
        for start in range(0, n, batch_size):
            chunk = images[start : start + batch_size]
            size = len(chunk)
            # Padded to one shape, so that every batch reuses one compiled function.
            pad = min(batch_size, n) - size
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            chunk_labels = None
            if labels is not None:
                chunk_labels = np.concatenate([labels[start : start + size], np.zeros(pad, int)])
            nats = _loss_at_jit(
                model,
                variables,
                chunk,
                chunk_labels,
                jnp.float32(t[k]),
                bin_key,
                start,
                jnp.bool_(linear),
            )
            bpd = np.asarray(losses.bits_per_dim(nats, num_dims), np.float64)[:size]
            sums[:, k] += bpd.sum(), np.square(bpd).sum()
            if progress is not None:
                progress.update(1)
    mean = sums[0] / n
    return LossByTime(t=t, mean=mean, variance=np.maximum(sums[1] / n - mean**2, 0.0), num_images=n)
