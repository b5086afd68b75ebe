"""The maths of MuLAN's multivariate learned schedule and its auxiliary latent.

MuLAN (Sahoo, Gokaslan, De Sa, Kuleshov, "Diffusion Models With Learned Adaptive Noise",
NeurIPS 2024, arXiv 2312.13236) gives every pixel its own schedule gamma_i(t, c), conditioned
on an auxiliary latent c ~ q(c|x) whose KL against a prior p(c) joins the bound:

    -log p(x) <= KL(q(c|x) || p(c)) + E_c[prior + reconstruction + diffusion](x, c).

This module holds the schedule family (:class:`PolynomialSchedule`) and the latent's pure
functions: the Gaussian KL (:func:`gaussian_kl`), and the relaxed top-k embedding of their
``topk`` latent (:func:`topk_noise`, :func:`relaxed_topk`) with its KL term
(:func:`categorical_uniform_kl`). The per-pixel bound terms themselves are the functions of
:mod:`vdm_jax.maths.diffusion` and :mod:`vdm_jax.maths.losses` given a gamma of the data's
shape.

Public names: :class:`PolynomialSchedule`, :func:`gaussian_kl`,
:func:`categorical_uniform_kl`, :func:`topk_noise`, :func:`relaxed_topk`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError

Array = jax.Array

__all__ = [
    "PolynomialSchedule",
    "categorical_uniform_kl",
    "gaussian_kl",
    "relaxed_topk",
    "topk_noise",
]


def _integral(a: Array, b: Array, c: Array, t: Array | float) -> Array:
    """P(t) = int_0^t (a u^2 + b u + c)^2 du from its monomial coefficients.

    Written as a sum of monomials (not Horner's form): with b close to -c, as trained
    schedules have, Horner's nested products round differently enough to move gamma by
    1e-4; the monomial sum agrees with the authors' evaluation to float32 rounding.
    """
    return (
        a * a * t**5 / 5.0
        + (b * b + 2.0 * a * c) * t**3 / 3.0
        + a * b * t**4 / 2.0
        + b * c * t**2
        + c * c * t
    )


class PolynomialSchedule(nn.Module):
    """MuLAN's per-pixel polynomial schedule with fixed endpoints, ``gamma(t, c)``.

    gamma_i(t, c) = gamma_min + (gamma_max - gamma_min) P_i(t) / P_i(1), with
    P_i(t) = int_0^t (a_i u^2 + b_i u + c_i)^2 du (the authors' ``poly_fixedend``), so
    gamma_i(0) = gamma_min and gamma_i(1) = gamma_max (to the float32 rounding of
    gamma_min + (gamma_max - gamma_min)) whatever c, and gamma_i is non-decreasing in t.
    The coefficients of every pixel come from the latent c through a small network:
    h = swish(Dense(swish(Dense(c)))) with ``n_features`` units, then a = Dense(h),
    b = Dense(h), c_i = 1e-3 + softplus(Dense(h)) (positive, so P(1) > 0), each with
    H * W * C outputs read in row-major [H, W, C] order. ``a``'s layer is zero-initialised,
    as theirs.

    Attributes:
      image_shape: (H, W, C) of the data; the authors' is fixed at (32, 32, 3).
      n_features: width of the two hidden layers (3072 in the authors' runs).
      gamma_min, gamma_max: the fixed endpoints gamma(0), gamma(1) (-13.3, 5).
    """

    image_shape: tuple[int, int, int] = (32, 32, 3)
    n_features: int = 3072
    gamma_min: float = -13.3
    gamma_max: float = 5.0

    def __post_init__(self):
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise UserError(
                f"image_shape must be (H, W, C) of positive sizes, got {self.image_shape}"
            )
        if not self.gamma_max > self.gamma_min:
            raise UserError(
                f"gamma_max must exceed gamma_min, got {self.gamma_min}, {self.gamma_max}"
            )
        if self.n_features < 1:
            raise UserError(f"n_features must be >= 1, got {self.n_features}")
        super().__post_init__()

    @nn.compact
    def coefficients(self, c: Array) -> tuple[Array, Array, Array]:
        """(a, b, c) of every pixel, each float32 ``[B, H, W, C]``, from the latent ``[B, D]``."""
        size = math.prod(self.image_shape)
        h = nn.swish(nn.Dense(self.n_features, name="dense_1")(c))
        h = nn.swish(nn.Dense(self.n_features, name="dense_2")(h))
        zeros = nn.initializers.zeros
        a = nn.Dense(size, kernel_init=zeros, bias_init=zeros, name="dense_out_a")(h)
        b = nn.Dense(size, name="dense_out_b")(h)
        c0 = 1e-3 + nn.softplus(nn.Dense(size, name="dense_out_c")(h))
        shape = (c.shape[0], *self.image_shape)
        return a.reshape(shape), b.reshape(shape), c0.reshape(shape)

    def _times(self, t: Array, batch: int) -> Array:
        t = jnp.asarray(t, jnp.float32)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != batch):
            raise ValueError(f"t must be a scalar or have shape [B]=({batch},), got {t.shape}")
        return jnp.broadcast_to(t, (batch,)).reshape(batch, 1, 1, 1)

    def gamma_and_derivative(self, c: Array, t: Array) -> tuple[Array, Array]:
        """gamma(t, c) and its exact t-derivative, each float32 ``[B, H, W, C]``.

        d gamma_i / dt = (gamma_max - gamma_min) (a_i t^2 + b_i t + c_i)^2 / P_i(1).

        Args:
          c: the latent, float ``[B, D]``.
          t: times in [0, 1], scalar or ``[B]``.
        """
        a, b, c0 = self.coefficients(c)
        t = self._times(t, c.shape[0])
        span = self.gamma_max - self.gamma_min
        scale = _integral(a, b, c0, 1.0)
        gamma = self.gamma_min + span * _integral(a, b, c0, t) / scale
        rate = span * jnp.square((a * t + b) * t + c0) / scale
        return gamma, rate

    def __call__(self, c: Array, t: Array) -> Array:
        """gamma(t, c), float32 ``[B, H, W, C]``; ``c`` ``[B, D]``, ``t`` scalar or ``[B]``."""
        return self.gamma_and_derivative(c, t)[0]


def gaussian_kl(mean: Array, var: Array) -> Array:
    """KL(N(mean, diag(var)) || N(0, I)) per example: 1/2 sum(mean^2 + var - log var - 1).

    Args:
      mean, var: float ``[B, D]``, var > 0.

    Returns:
      float ``[B]``, nats.
    """
    return 0.5 * jnp.sum(jnp.square(mean) + var - jnp.log(var) - 1.0, axis=-1)


def categorical_uniform_kl(logits: Array) -> Array:
    """KL(Cat(softmax(logits)) || uniform over D) per example: sum q (log q + log D).

    MuLAN's ``topk`` latent reports this figure as the latent's KL (see
    :func:`relaxed_topk` for why it is not the KL of the distribution its embedding follows).

    Args:
      logits: float ``[B, D]``.

    Returns:
      float ``[B]``, nats, in [0, log D].
    """
    log_q = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(log_q) * (log_q + math.log(logits.shape[-1])), axis=-1)


def topk_noise(key: Array, k: int, shape: tuple[int, ...], tau: float = 10.0, terms: int = 10):
    """MuLAN's perturbation of the top-k logits: a scaled sum of Gamma variables.

    s = tau / k (sum_{j=1..terms} G_j j / k - log terms), with G_j ~ Gamma(1 / k) i.i.d.: the
    truncated series of the "sum of Gammas" noise whose top-k is a relaxed top-k sample
    (Xie & Ermon 2019 style perturbed top-k), with the authors' tau = 10 and 10 terms.

    Args:
      key: a PRNG key.
      k: the number of chosen entries.
      shape: the logits' shape, e.g. ``(B, D)``.

    Returns:
      float32 array of ``shape``.
    """
    draws = jax.random.gamma(key, 1.0 / k, shape=(terms, *shape))
    rate = jnp.arange(1, terms + 1, dtype=jnp.float32).reshape((terms,) + (1,) * len(shape)) / k
    return tau * (jnp.sum(draws * rate, axis=0) - math.log(terms)) / k


def relaxed_topk(logits: Array, k: int) -> Array:
    """MuLAN's relaxed top-k embedding: the k-hot of the top-k logits, with a soft gradient.

    Forward value: 1 at the k largest logits of each row (ties included), 0 elsewhere. Gradient:
    that of the centred, normalised logits (l - mean l) / ||l - mean l|| (straight-through,
    Sahoo et al. 2022). Given perturbed logits (logits + :func:`topk_noise`) this is how their
    ``topk`` latent draws c; its KL term is :func:`categorical_uniform_kl` of the unperturbed
    logits. That term is the KL of a one-hot categorical q(c|x) = softmax(logits) against a
    uniform prior over D, not the KL between the distribution of this k-hot (over the
    D-choose-k subsets, induced by the noise) and any prior the sampler uses, so the bound it
    enters is the authors' estimate rather than a proven upper bound on -log p(x).

    Args:
      logits: float ``[B, D]``, perturbed or not.
      k: entries set to 1 per row, 1 <= k <= D.

    Returns:
      float32 ``[B, D]``.
    """
    centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
    soft = centred / jnp.linalg.norm(centred, axis=-1, keepdims=True)
    kth = jax.lax.top_k(centred, k)[0][:, -1:]
    hard = (centred >= kth).astype(soft.dtype)
    return jax.lax.stop_gradient(hard - soft) + soft
