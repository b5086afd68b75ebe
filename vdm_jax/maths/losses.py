"""The terms of the VDM variational bound, per example, in nats.

The bound on -log p(x) is prior + reconstruction + diffusion. Each function here returns one
term per example (shape ``[B]``, float32, nats), summed over every non-batch axis; divide by
the number of dimensions with :func:`bits_per_dim` to report bits/dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError
from vdm_jax.maths.diffusion import encode, expand_gamma

__all__ = [
    "bits_per_dim",
    "decoder_log_probs",
    "diffusion_loss_continuous",
    "diffusion_loss_discrete",
    "importance_weighted_diffusion_loss",
    "prior_kl",
    "reconstruction_nll",
    "weighted_diffusion_loss",
    "window_gamma_limit",
    "windowed_reconstruction_nll",
]

Array = jax.Array


def _sum_per_example(values: Array) -> Array:
    """Sum over all axes but the first (the batch axis)."""
    return jnp.sum(values, axis=tuple(range(1, jnp.ndim(values))))


def prior_kl(x: Array, gamma_1: Array) -> Array:
    """KL(q(z_1|x) || N(0, I)) per example.

    Per dimension 1/2 (sigma_1^2 + alpha_1^2 x^2 - 1 - log sigma_1^2), evaluated as
    1/2 (alpha_1^2 (x^2 - 1) + softplus(-gamma_1)) so that nothing cancels.

    Args:
      x: encoded data, float ``[B, ...]``.
      gamma_1: gamma at t = 1, scalar or a prefix of ``x.shape`` (``x.shape`` itself for a
        multivariate schedule: then the KL is summed over dimensions with their own gamma).

    Returns:
      float ``[B]``, nats.
    """
    g = expand_gamma(gamma_1, jnp.ndim(x))
    kl = 0.5 * (jax.nn.sigmoid(-g) * (jnp.square(x) - 1.0) + jax.nn.softplus(-g))
    return _sum_per_example(jnp.broadcast_to(kl, jnp.shape(x)))


def decoder_log_probs(z_0: Array, gamma_0: Array, vocab_size: int) -> Array:
    """Log-probabilities of the per-dimension categorical decoder p(x|z_0) of the paper.

    p(x = v | z_0) is proportional to N(z_0; alpha_0 e_v, sigma_0^2) with e_v = encode(v), i.e.
    the logits are -1/2 (z_0 / alpha_0 - e_v)^2 SNR_0.

    Args:
      z_0: latent at t = 0, float ``[B, ...]``.
      gamma_0: gamma at t = 0, scalar or a prefix of ``z_0.shape``.
      vocab_size: V.

    Returns:
      float ``z_0.shape + (V,)``, normalised over the last axis (log-softmax).
    """
    ndim = jnp.ndim(z_0)
    g = expand_gamma(gamma_0, ndim)[..., None]
    values = encode(jnp.arange(vocab_size), vocab_size)
    z_rescaled = z_0[..., None] * jnp.exp(0.5 * jax.nn.softplus(g))  # z_0 / alpha_0
    logits = -0.5 * jnp.square(z_rescaled - values) * jnp.exp(-g)
    return jax.nn.log_softmax(logits, axis=-1)


def reconstruction_nll(x_int: Array, z_0: Array, gamma_0: Array, vocab_size: int) -> Array:
    """-log p(x|z_0) per example, with the decoder of :func:`decoder_log_probs`.

    Args:
      x_int: integer data, ``[B, ...]``, values in 0..V-1.
      z_0: latent at t = 0, float, ``x_int.shape``.
      gamma_0: scalar or a prefix of ``z_0.shape`` (``z_0.shape`` for a per-pixel gamma).
      vocab_size: V.

    Returns:
      float ``[B]``, nats.
    """
    log_probs = decoder_log_probs(z_0, gamma_0, vocab_size)
    picked = jnp.take_along_axis(log_probs, jnp.asarray(x_int, jnp.int32)[..., None], axis=-1)
    return -_sum_per_example(picked[..., 0])


# The reconstruction term's decoder normalises over all V values of a pixel, but at the gamma_0 of
# a trained model (about -13) only the few bins nearest z_0 / alpha_0 carry any probability.
# `windowed_reconstruction_nll` with a window w > 0 sums over the 2 w + 1 bins around the nearest
# one whenever gamma_0 is low enough for every bin outside it to have a logit at least _WINDOW_GAP
# below the largest: each such term is then below exp(-30) ~ 1e-13 of the sum, far under a float32
# ulp (6e-8) even added V times, so the result is the full log-softmax's to float32 rounding,
# gradient included; above that gamma_0 it computes the full softmax.
_WINDOW_GAP = 30.0


def window_gamma_limit(vocab_size: int, window: int = 4, gap: float = _WINDOW_GAP) -> float:
    """The largest gamma_0 at which :func:`windowed_reconstruction_nll` may sum over the window.

    A bin m >= window + 1 bins from the nearest one to a = z_0 / alpha_0 lies at least
    (m - 1/2) bin widths from a, so its logit -SNR_0 (a - e_v)^2 / 2 is at least
    SNR_0 m (m - 1) width^2 / 2 below the largest. Requiring that to be >= ``gap`` for
    m = window + 1 gives SNR_0 >= 2 gap / (window (window + 1) width^2), i.e. this gamma_0.
    """
    width = 2.0 / vocab_size
    return math.log(window * (window + 1) * width**2 / (2.0 * gap))


def windowed_reconstruction_nll(
    x_int: Array,
    z_0: Array,
    gamma_0: Array,
    vocab_size: int,
    window: int = 0,
    *,
    custom_gradient: bool = False,
) -> Array:
    """-log p(x|z_0) per example: :func:`reconstruction_nll`, or cheaper.

    The same categorical decoder, logits -1/2 (z_0 / alpha_0 - e_v)^2 SNR_0 over the V values
    e_v. With ``window > 0`` and a scalar ``gamma_0`` (the model's gamma(0)), a ``lax.cond``
    decides each call: when ``gamma_0 <= window_gamma_limit(V, window)`` the normaliser is
    summed over the ``2 * window + 1`` values around the nearest one instead of all V (see the
    comment above ``_WINDOW_GAP``): equal to float32 rounding, about V / (2 * window + 1) times
    less work, which pays on CPUs. Otherwise (``window = 0``, V no larger than the window, a
    per-example ``gamma_0``, or gamma_0 above the limit) it is the full computation. On
    accelerators the full softmax is cheap and the conditional makes the device report its
    predicate to the host every step, so ``window = 0`` suits them.

    Args:
      x_int: integer data ``[B, ...]`` in 0..V-1.
      z_0: latent at t = 0, float32, ``x_int.shape``.
      gamma_0: gamma(0), a float32 scalar (or ``[B, ...]``, then always the full computation).
      vocab_size: V.
      window: bins on each side of the nearest one; 0 computes the full softmax.
      custom_gradient: differentiate through a custom VJP that recomputes the branch taken
        (reverse mode only; what ``VDM`` uses for training). Without it, JAX differentiates
        the ``lax.cond``, whose two branches then both return [B, H, W, C, V] residuals.

    Returns:
      float32 ``[B]``, nats.
    """
    if window < 0:
        raise UserError(f"window must be >= 0 (0: the full softmax), got {window}")
    if window == 0 or vocab_size <= 2 * window + 1 or jnp.ndim(gamma_0) != 0:
        return reconstruction_nll(x_int, z_0, gamma_0, vocab_size)
    if custom_gradient:
        return _windowed_or_full(x_int, z_0, gamma_0, vocab_size, window)
    windowed, full_branch = _branches(vocab_size, window)
    return jax.lax.cond(
        _use_window(gamma_0, vocab_size, window), windowed, full_branch, x_int, z_0, gamma_0
    )


def _windowed_nll(x_int, z_0, gamma_0, vocab_size, window):
    """The reconstruction term with the normaliser summed over the window (see above)."""
    snr = jnp.exp(-gamma_0)
    a = z_0 * jnp.exp(0.5 * jax.nn.softplus(gamma_0))  # z_0 / alpha_0
    # Nearest value k (e_v = (2v + 1) / V - 1), then the window's first value.
    nearest = jnp.floor((a + 1.0) * (0.5 * vocab_size))
    start = jnp.clip(nearest, window, vocab_size - 1 - window) - window
    offsets = jnp.arange(2 * window + 1, dtype=jnp.float32)
    values = encode(start[..., None] + offsets, vocab_size)
    logits = -0.5 * jnp.square(a[..., None] - values) * snr  # [..., 2 * window + 1]
    # As jax.nn.log_softmax: shift by the largest logit, so that the most likely value gets
    # exactly 0 - log(1 + tiny) = 0 as in the full computation.
    largest = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    shifted = logits - largest[..., None]
    index = jnp.asarray(x_int, jnp.float32) - start
    inside = (index >= 0) & (index <= 2 * window)
    picked = jnp.sum(jnp.where(offsets == index[..., None], shifted, 0.0), axis=-1)
    # A value outside the window (a tail event): its logit directly.
    direct = -0.5 * jnp.square(a - encode(x_int, vocab_size)) * snr - largest
    log_p = jnp.where(inside, picked, direct) - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    return -jnp.sum(log_p, axis=tuple(range(1, log_p.ndim)))


def _branches(vocab_size, window):
    return (
        lambda x, z, g: _windowed_nll(x, z, g, vocab_size, window),
        lambda x, z, g: reconstruction_nll(x, z, g, vocab_size),
    )


def _use_window(gamma_0, vocab_size, window):
    return gamma_0 <= window_gamma_limit(vocab_size, window)


# A custom VJP so that the backward pass recomputes the branch it needs: differentiating a
# lax.cond directly makes both branches return the residuals of either, so the cheap branch
# would fill and copy the full branch's [B, H, W, C, V] residual arrays with zeros every step.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _windowed_or_full(x_int, z_0, gamma_0, vocab_size, window):
    windowed, full = _branches(vocab_size, window)
    return jax.lax.cond(
        _use_window(gamma_0, vocab_size, window), windowed, full, x_int, z_0, gamma_0
    )


def _windowed_or_full_fwd(x_int, z_0, gamma_0, vocab_size, window):
    return _windowed_or_full(x_int, z_0, gamma_0, vocab_size, window), (x_int, z_0, gamma_0)


def _windowed_or_full_bwd(vocab_size, window, residuals, cotangent):
    x_int, z_0, gamma_0 = residuals

    def vjp_of(fn):
        def branch(x_int, z_0, gamma_0):
            _, pullback = jax.vjp(lambda z, g: fn(x_int, z, g), z_0, gamma_0)
            return pullback(cotangent)

        return branch

    windowed, full = _branches(vocab_size, window)
    d_z_0, d_gamma_0 = jax.lax.cond(
        _use_window(gamma_0, vocab_size, window), vjp_of(windowed), vjp_of(full),
        x_int, z_0, gamma_0,
    )  # fmt: skip
    return None, d_z_0, d_gamma_0


_windowed_or_full.defvjp(_windowed_or_full_fwd, _windowed_or_full_bwd)


def diffusion_loss_continuous(eps: Array, eps_hat: Array, dgamma_dt: Array) -> Array:
    """The continuous-time diffusion loss 1/2 sum_i gamma_i'(t) (eps_i - eps_hat_i)^2.

    An unbiased one-sample estimate of L_inf when t ~ U(0, 1). With one schedule for the
    whole example (``dgamma_dt`` scalar or ``[B]``) it is 1/2 gamma'(t) ||eps - eps_hat||^2;
    with a multivariate schedule (one gamma per dimension, ``dgamma_dt`` of ``eps.shape``,
    MuLAN, Sahoo et al. 2024, eq. 10) each dimension is weighted by its own rate.

    Args:
      eps, eps_hat: true and predicted noise, float ``[B, ...]``.
      dgamma_dt: gamma'(t), scalar or a prefix of ``eps.shape`` (``[B]``, or ``eps.shape``).

    Returns:
      float ``[B]``, nats.
    """
    dgamma_dt = jnp.asarray(dgamma_dt)
    squared = jnp.square(eps - eps_hat)
    if dgamma_dt.ndim <= 1:  # one rate per example factors out of the sum
        return 0.5 * dgamma_dt * _sum_per_example(squared)
    return 0.5 * _sum_per_example(expand_gamma(dgamma_dt, jnp.ndim(eps)) * squared)


def diffusion_loss_continuous_v(v: Array, v_hat: Array, gamma_t: Array, dgamma_dt: Array) -> Array:
    """The continuous-time diffusion loss written for a v-prediction, per example.

    1/2 sum_i alpha_i^2 gamma_i'(t) (v_i - v_hat_i)^2 with alpha_i^2 = sigmoid(-gamma_i): since
    eps - eps_hat = alpha (v - v_hat) when eps_hat = sigma z + alpha v_hat, it is
    :func:`diffusion_loss_continuous` of the same prediction, written as MuLAN's velocity model
    writes it. Uni- or multivariate like that function.

    Args:
      v, v_hat: target v = alpha eps - sigma x and its prediction, float ``[B, ...]``.
      gamma_t: gamma at the sampled times, scalar or a prefix of ``v.shape``.
      dgamma_dt: gamma'(t), scalar or a prefix of ``v.shape``.

    Returns:
      float ``[B]``, nats.
    """
    ndim = jnp.ndim(v)
    weight = jax.nn.sigmoid(-expand_gamma(gamma_t, ndim)) * expand_gamma(dgamma_dt, ndim)
    return 0.5 * _sum_per_example(weight * jnp.square(v - v_hat))


def weighted_diffusion_loss(
    eps: Array, eps_hat: Array, gamma_t: Array, dgamma_dt: Array, weight
) -> Array:
    """The weighted diffusion loss 1/2 w(lambda_t) gamma'(t) ||eps - eps_hat||^2, per example.

    An unbiased one-sample estimate, for t ~ U(0, 1), of Kingma & Gao's (2023) weighted loss
    L_w = 1/2 E_t[w(lambda_t) (-dlambda/dt) ||eps - eps_hat||^2] with lambda = -gamma (so
    -dlambda/dt = gamma'(t)). With weight 1 it is :func:`diffusion_loss_continuous` to the
    last bit. Any schedule with the same endpoints has the same expectation. A noise level
    drawn from a density p(gamma) instead of a schedule is the case gamma'(t) = 1 / p(gamma)
    (see :func:`importance_weighted_diffusion_loss`).

    Args:
      eps, eps_hat: true and predicted noise, float ``[B, ...]``.
      gamma_t: gamma at the sampled times, scalar or ``[B]``.
      dgamma_dt: gamma'(t), scalar or ``[B]``.
      weight: w(lambda_t) as an array (scalar or ``[B]``), or a function of lambda (such as a
        :class:`vdm_jax.maths.weightings.Weighting`) evaluated at lambda = -gamma_t.

    Returns:
      float ``[B]``, nats (of the weighted objective; nats of the bound only when w = 1).
    """
    if callable(weight):
        weight = weight(-jnp.asarray(gamma_t))
    return (
        0.5
        * jnp.asarray(weight)
        * jnp.asarray(dgamma_dt)
        * _sum_per_example(jnp.square(eps - eps_hat))
    )


def importance_weighted_diffusion_loss(
    eps: Array, eps_hat: Array, weight: Array, density: Array
) -> Array:
    """The weighted loss with noise levels drawn from a density: 1/2 w / p ||eps - eps_hat||^2.

    An unbiased one-sample estimate of L_w = 1/2 E_{lambda ~ p}[w(lambda) / p(lambda)
    ||eps - eps_hat||^2] when lambda is drawn from p, for any p that is positive on
    [lambda_min, lambda_max] (Kingma & Gao 2023, importance sampling of the noise level).
    With weight 1 it estimates the ELBO's diffusion term.

    Args:
      eps, eps_hat: true and predicted noise, float ``[B, ...]``.
      weight: w(lambda) at the sampled levels, scalar or ``[B]``.
      density: p(lambda) at the sampled levels, per unit of lambda (= per unit of gamma),
        positive, scalar or ``[B]``.

    Returns:
      float ``[B]``, nats of the weighted objective.
    """
    return (
        0.5
        * (jnp.asarray(weight) / jnp.asarray(density))
        * _sum_per_example(jnp.square(eps - eps_hat))
    )


def diffusion_loss_discrete(
    eps: Array, eps_hat: Array, gamma_s: Array, gamma_t: Array, num_steps: int
) -> Array:
    """The discrete-time diffusion loss T/2 expm1(gamma_t - gamma_s) ||eps - eps_hat||^2.

    An unbiased one-sample estimate of L_T when t = i/T, s = (i - 1)/T with i ~ U{1..T}.

    Args:
      eps, eps_hat: true and predicted noise (at time t), float ``[B, ...]``.
      gamma_s, gamma_t: gamma at s < t, scalars or ``[B]``.
      num_steps: T, a positive integer.

    Returns:
      float ``[B]``, nats.
    """
    if num_steps < 1:
        raise UserError(f"num_steps must be a positive integer, got {num_steps}")
    weight = jnp.expm1(jnp.asarray(gamma_t) - jnp.asarray(gamma_s))
    return 0.5 * num_steps * weight * _sum_per_example(jnp.square(eps - eps_hat))


def bits_per_dim(nats: Array, num_dims: int) -> Array:
    """Convert nats per example to bits per dimension: nats / (num_dims ln 2)."""
    if num_dims < 1:
        raise UserError(f"num_dims must be a positive integer, got {num_dims}")
    return jnp.asarray(nats) / (num_dims * math.log(2.0))
