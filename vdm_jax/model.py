"""The VDM model: a noise schedule and a score network, and the variational bound they define.

:class:`VDM` takes plain arguments (two Linen modules and a few numbers), so it can be built
from a config, by hand, or with a network of your own that has the ``ScoreUNet`` signature
``score_net(z, gamma_t, labels, train=...) -> eps_hat``.

RNG streams used by ``VDM.__call__``: ``'diffusion'`` (times and noise) and, when
``train=True`` with dropout, ``'dropout'``.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax import diffusion, losses, schedules
from vdm_jax.nets import ScoreUNet

Array = jax.Array

SCHEDULES = {
    "fixed_linear": schedules.FixedLinearSchedule,
    "learned_linear": schedules.LearnedLinearSchedule,
    "monotonic": schedules.MonotonicSchedule,
}


class VLBTerms(NamedTuple):
    """The variational bound per example.

    Attributes:
      prior: KL(q(z_1|x) || N(0, I)), ``[B]`` float32, nats.
      reconstruction: -log p(x|z_0), ``[B]`` float32, nats.
      diffusion: the diffusion loss (continuous L_inf or discrete L_T), ``[B]`` float32, nats.
      bpd: the whole bound (sum of the three) in bits per dimension, ``[B]`` float32.
    """

    prior: Array
    reconstruction: Array
    diffusion: Array
    bpd: Array


def make_schedule(
    kind: str,
    gamma_min: float = schedules.GAMMA_MIN,
    gamma_max: float = schedules.GAMMA_MAX,
    n_features: int = 1024,
) -> nn.Module:
    """A schedule module by name: 'fixed_linear', 'learned_linear' or 'monotonic'.

    Args:
      kind: the schedule's name.
      gamma_min, gamma_max: gamma(0) and gamma(1) (initial values when learned).
      n_features: hidden width of the monotonic network (ignored by the linear ones).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {kind!r}; known: {sorted(SCHEDULES)}")
    if kind == "monotonic":
        return schedules.MonotonicSchedule(gamma_min, gamma_max, n_features=n_features)
    return SCHEDULES[kind](gamma_min, gamma_max)


class VDM(nn.Module):
    """A Variational Diffusion Model: the bound on -log p(x) and the pieces samplers need.

    Attributes:
      score_net: eps-prediction network, called ``score_net(z, gamma_t, labels, train=...)``
        with z ``[B, H, W, C]`` float32 and gamma_t ``[B]``; :class:`~vdm_jax.nets.ScoreUNet`
        by default.
      schedule: a schedule module (see :mod:`vdm_jax.schedules`); learned linear by default.
      vocab_size: V, the number of values a data dimension takes (256 for 8-bit images).
      num_steps: T; 0 means continuous time (the paper's default), T > 0 the discrete-time
        bound with times i/T.
      antithetic_time_sampling: draw the batch's times as (u + i/B) mod 1 (lower variance).
      variance_gradient: train the schedule's shape to minimise the variance of the diffusion
        loss (paper, appendix I.2); continuous time only.
    """

    score_net: nn.Module = ScoreUNet()
    schedule: nn.Module = schedules.LearnedLinearSchedule()
    vocab_size: int = 256
    num_steps: int = 0
    antithetic_time_sampling: bool = True
    variance_gradient: bool = False

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be 0 (continuous) or positive, got {self.num_steps}")
        if self.variance_gradient and self.num_steps:
            raise ValueError(
                "variance_gradient needs the continuous-time loss (num_steps=0), got "
                f"num_steps={self.num_steps}"
            )
        super().__post_init__()

    def gamma(self, t: Array) -> Array:
        """gamma(t) for times in [0, 1] of any shape; float32."""
        return self.schedule(t)

    def endpoints(self) -> tuple[Array, Array]:
        """(gamma(0), gamma(1)), float32 scalars."""
        return self.schedule.endpoints()

    def predict_noise(
        self, z: Array, gamma_t: Array, labels: Array | None = None, *, train: bool = False
    ) -> Array:
        """eps_hat for latents z ``[B, H, W, C]`` float32 at gamma_t (scalar or ``[B]``)."""
        return self.score_net(z, gamma_t, labels, train=train)

    def decode_log_probs(self, z_0: Array) -> Array:
        """log p(x|z_0) over the vocabulary: ``z_0.shape + (vocab_size,)``, float32."""
        gamma_0, _ = self.endpoints()
        return losses.decoder_log_probs(z_0, gamma_0, self.vocab_size)

    def _times(self, batch: int) -> Array:
        key = self.make_rng("diffusion")
        if self.antithetic_time_sampling:
            return jnp.mod(jax.random.uniform(key, ()) + jnp.arange(batch) / batch, 1.0)
        return jax.random.uniform(key, (batch,))

    def __call__(
        self,
        images: Array,
        labels: Array | None = None,
        *,
        train: bool,
        num_steps: int | None = None,
    ) -> VLBTerms:
        """The variational bound of a batch, one sample of (t, noise) per example.

        Args:
          images: integer data ``[B, H, W, C]`` (uint8 for images), values in 0..V-1.
          labels: int ``[B]`` class labels for a class-conditional score network, or None.
          train: dropout on or off.
          num_steps: overrides the module's T for this call (e.g. 1000 to evaluate the
            discrete-time bound of a model trained in continuous time); 0 is continuous.

        Returns:
          :class:`VLBTerms`, each ``[B]``.
        """
        if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.integer):
            raise ValueError(
                f"images must be integers [B, H, W, C], got shape {images.shape}, "
                f"dtype {images.dtype}"
            )
        num_steps = self.num_steps if num_steps is None else num_steps
        if num_steps < 0:
            raise ValueError(f"num_steps must be 0 (continuous) or positive, got {num_steps}")
        batch = images.shape[0]
        x = diffusion.encode(images, self.vocab_size)
        gamma_0, gamma_1 = self.endpoints()
        key = self.make_rng("diffusion")
        eps_0, eps = jax.random.normal(key, (2, *x.shape))

        prior = losses.prior_kl(x, gamma_1)
        z_0 = diffusion.q_sample(x, gamma_0, eps_0)
        reconstruction = losses.reconstruction_nll(images, z_0, gamma_0, self.vocab_size)

        t = self._times(batch)
        if num_steps:
            t = jnp.ceil(t * num_steps) / num_steps  # i/T, i in 1..T
            t = jnp.maximum(t, 1.0 / num_steps)  # u = 0 exactly would give i = 0
            gamma_t = self.gamma(t)
            gamma_s = self.gamma(t - 1.0 / num_steps)
        elif self.variance_gradient:
            gamma_t, dgamma_dt, channel = schedules.gamma_with_variance_gradient(self.schedule, t)
        else:
            gamma_t, dgamma_dt = schedules.gamma_and_derivative(self.schedule, t)

        z_t = diffusion.q_sample(x, gamma_t, eps)
        eps_hat = self.predict_noise(z_t, gamma_t, labels, train=train)
        if num_steps:
            diff = losses.diffusion_loss_discrete(eps, eps_hat, gamma_s, gamma_t, num_steps)
        else:
            diff = losses.diffusion_loss_continuous(eps, eps_hat, dgamma_dt)
            if self.variance_gradient:
                diff = schedules.emit_variance_gradient(diff, channel)

        num_dims = x.shape[1] * x.shape[2] * x.shape[3]
        bpd = losses.bits_per_dim(prior + reconstruction + diff, num_dims)
        return VLBTerms(prior, reconstruction, diff, bpd)
