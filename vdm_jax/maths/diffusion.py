"""The variance-preserving forward process of VDM and its posterior, as pure functions.

Everything is written in terms of gamma = -log SNR (``gamma_t`` below), so that
alpha_t^2 = sigmoid(-gamma_t) and sigma_t^2 = sigmoid(gamma_t). Quantities such as
1 - alpha^2 are never formed by subtraction: over the paper's range gamma in [-13.3, 5] a
float32 subtraction would lose every significant digit at the low-noise end.

Broadcasting: a ``gamma`` argument is a scalar or an array whose shape is a *prefix* of the
data's shape (typically ``[B]`` for data ``[B, H, W, C]``); it is broadcast over the trailing
axes. The whole shape ``[B, H, W, C]`` is the multivariate case (one gamma per pixel, as in
MuLAN, Sahoo et al. 2024): every function here is then per pixel, and the univariate case is
its broadcast. All functions are jit-, vmap- and grad-safe; dtypes follow the inputs (float32 in
practice).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError

__all__ = [
    "PARAMETERIZATIONS",
    "alpha_sigma",
    "ancestral_step",
    "encode",
    "eps_from_score",
    "eps_from_v",
    "eps_from_x",
    "expand_gamma",
    "from_eps",
    "posterior",
    "predict_x",
    "q_sample",
    "q_step",
    "score_from_eps",
    "snr",
    "to_eps",
    "transition",
    "v_from_eps",
    "v_from_x",
    "x_from_v",
]

Array = jax.Array


def expand_gamma(gamma: Array, ndim: int) -> Array:
    """``gamma`` with singleton axes appended, so that it broadcasts against data of ``ndim`` axes.

    Args:
      gamma: a scalar or an array whose shape is a prefix of the data's shape (e.g. ``[B]``).
      ndim: the number of axes of the data.

    Returns:
      ``gamma`` reshaped to ``gamma.shape + (1,) * (ndim - gamma.ndim)``, same dtype.
    """
    gamma = jnp.asarray(gamma)
    if gamma.ndim > ndim:
        raise UserError(
            f"gamma has shape {gamma.shape}, more axes than the data it applies to ({ndim})"
        )
    return gamma.reshape(gamma.shape + (1,) * (ndim - gamma.ndim))


def _log_expm1(d: Array) -> Array:
    """log(exp(d) - 1) for d > 0, accurate for small and large d alike."""
    return d + jnp.log(-jnp.expm1(-d))


def alpha_sigma(gamma: Array) -> tuple[Array, Array]:
    """Signal and noise scales of q(z_t|x) = N(alpha_t x, sigma_t^2 I).

    Args:
      gamma: gamma_t = -log SNR(t), any shape, float.

    Returns:
      ``(alpha, sigma)``, each the shape of ``gamma``: alpha = sqrt(sigmoid(-gamma)),
      sigma = sqrt(sigmoid(gamma)), so alpha^2 + sigma^2 = 1.
    """
    gamma = jnp.asarray(gamma)
    return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def snr(gamma: Array) -> Array:
    """Signal-to-noise ratio alpha^2 / sigma^2 = exp(-gamma); same shape as ``gamma``."""
    return jnp.exp(-jnp.asarray(gamma))


def q_sample(x: Array, gamma_t: Array, noise: Array) -> Array:
    """A sample of q(z_t|x) = N(alpha_t x, sigma_t^2 I), by reparameterisation.

    Args:
      x: data, float ``[B, ...]`` (already encoded to [-1, 1], see :func:`encode`).
      gamma_t: gamma at time t, scalar or a prefix of ``x.shape`` (e.g. ``[B]``).
      noise: standard normal noise, ``x.shape``.

    Returns:
      z_t = alpha_t x + sigma_t noise, ``x.shape``.
    """
    alpha, sigma = alpha_sigma(expand_gamma(gamma_t, jnp.ndim(x)))
    return alpha * x + sigma * noise


def transition(gamma_s: Array, gamma_t: Array) -> tuple[Array, Array]:
    """The forward transition q(z_t|z_s) = N(mean_coef z_s, var I) for s < t.

    mean_coef = alpha_t / alpha_s and var = sigma_t^2 - mean_coef^2 sigma_s^2 = 1 - mean_coef^2,
    which is the hierarchical encoder q(x_t|x_{t-1}) = N(sqrt(a_t) x_{t-1}, (1 - a_t) I) with
    a_t = mean_coef^2. Computed as var = sigmoid(w), mean_coef^2 = sigmoid(-w) with
    w = log_sigmoid(gamma_s) + log(expm1(gamma_t - gamma_s)), exact to a few float32 ulps even
    when gamma_t - gamma_s is tiny.

    Args:
      gamma_s, gamma_t: gamma at the earlier and later time, broadcastable, gamma_s < gamma_t.

    Returns:
      ``(mean_coef, var)``, dimensionless, of the broadcast shape.
    """
    gamma_s, gamma_t = jnp.asarray(gamma_s), jnp.asarray(gamma_t)
    w = jax.nn.log_sigmoid(gamma_s) + _log_expm1(gamma_t - gamma_s)
    return jnp.exp(0.5 * jax.nn.log_sigmoid(-w)), jax.nn.sigmoid(w)


def q_step(z_s: Array, gamma_s: Array, gamma_t: Array, noise: Array) -> Array:
    """One step of the hierarchical encoder: a sample of q(z_t|z_s), s < t.

    Args:
      z_s: latent at time s, float ``[B, ...]``.
      gamma_s, gamma_t: scalars or prefixes of ``z_s.shape``.
      noise: standard normal, ``z_s.shape``.

    Returns:
      z_t = sqrt(a_t) z_s + sqrt(1 - a_t) noise, ``z_s.shape``.
    """
    ndim = jnp.ndim(z_s)
    mean_coef, var = transition(expand_gamma(gamma_s, ndim), expand_gamma(gamma_t, ndim))
    return mean_coef * z_s + jnp.sqrt(var) * noise


def _posterior_coefs(gamma_s: Array, gamma_t: Array) -> tuple[Array, Array, Array]:
    """(alpha_s / alpha_t, c, posterior var), c = sigma_{t|s}^2 / sigma_t^2 = 1 - SNR_t / SNR_s."""
    c = -jnp.expm1(gamma_s - gamma_t)
    ratio = jnp.exp(0.5 * (jax.nn.softplus(gamma_t) - jax.nn.softplus(gamma_s)))
    return ratio, c, jax.nn.sigmoid(gamma_s) * c


def posterior(z_t: Array, x: Array, gamma_s: Array, gamma_t: Array) -> tuple[Array, Array]:
    """The posterior q(z_s|z_t, x) = N(mean, var I) for s < t.

    mean = alpha_{t|s} sigma_s^2/sigma_t^2 z_t + alpha_s sigma_{t|s}^2/sigma_t^2 x and
    var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2, evaluated as mean = alpha_s ((1 - c) z_t / alpha_t
    + c x), var = sigma_s^2 c with c = -expm1(gamma_s - gamma_t).

    Args:
      z_t: latent at time t, float ``[B, ...]``.
      x: data, ``z_t.shape``.
      gamma_s, gamma_t: scalars or prefixes of ``z_t.shape``, gamma_s < gamma_t.

    Returns:
      ``(mean, var)``: mean has ``z_t.shape``; var has the broadcast shape of the gammas with
      trailing singleton axes (it is the same for every dimension).
    """
    ndim = jnp.ndim(z_t)
    gamma_s, gamma_t = expand_gamma(gamma_s, ndim), expand_gamma(gamma_t, ndim)
    ratio, c, var = _posterior_coefs(gamma_s, gamma_t)
    alpha_s, _ = alpha_sigma(gamma_s)
    return ratio * (1.0 - c) * z_t + alpha_s * c * x, var


def predict_x(z_t: Array, eps_hat: Array, gamma_t: Array) -> Array:
    """The data prediction x_hat = (z_t - sigma_t eps_hat) / alpha_t.

    Args:
      z_t: latent, float ``[B, ...]``; eps_hat: predicted noise, same shape.
      gamma_t: scalar or a prefix of ``z_t.shape``.

    Returns:
      x_hat, ``z_t.shape``.
    """
    alpha, sigma = alpha_sigma(expand_gamma(gamma_t, jnp.ndim(z_t)))
    return (z_t - sigma * eps_hat) / alpha


# ----------------------------------------------------------------------------------------------
# Parameterisations of the network's output. With z_t = alpha x + sigma eps and
# v = alpha eps - sigma x (Salimans & Ho 2022), alpha^2 + sigma^2 = 1 gives
# eps = sigma z + alpha v, x = alpha z - sigma v and the score grad log q(z_t) = -eps / sigma.

PARAMETERIZATIONS = ("eps", "x", "v")


def eps_from_x(z_t: Array, x_hat: Array, gamma_t: Array) -> Array:
    """eps_hat = (z_t - alpha_t x_hat) / sigma_t; arrays ``[B, ...]``, gamma a prefix shape."""
    alpha, sigma = alpha_sigma(expand_gamma(gamma_t, jnp.ndim(z_t)))
    return (z_t - alpha * x_hat) / sigma


def eps_from_v(z_t: Array, v_hat: Array, gamma_t: Array) -> Array:
    """eps_hat = sigma_t z_t + alpha_t v_hat; arrays ``[B, ...]``, gamma a prefix shape."""
    alpha, sigma = alpha_sigma(expand_gamma(gamma_t, jnp.ndim(z_t)))
    return sigma * z_t + alpha * v_hat


def x_from_v(z_t: Array, v_hat: Array, gamma_t: Array) -> Array:
    """x_hat = alpha_t z_t - sigma_t v_hat; arrays ``[B, ...]``, gamma a prefix shape."""
    alpha, sigma = alpha_sigma(expand_gamma(gamma_t, jnp.ndim(z_t)))
    return alpha * z_t - sigma * v_hat


def v_from_eps(z_t: Array, eps_hat: Array, gamma_t: Array) -> Array:
    """v_hat = (eps_hat - sigma_t z_t) / alpha_t; arrays ``[B, ...]``, gamma a prefix shape."""
    alpha, sigma = alpha_sigma(expand_gamma(gamma_t, jnp.ndim(z_t)))
    return (eps_hat - sigma * z_t) / alpha


def v_from_x(z_t: Array, x_hat: Array, gamma_t: Array) -> Array:
    """v_hat = (alpha_t z_t - x_hat) / sigma_t; arrays ``[B, ...]``, gamma a prefix shape."""
    alpha, sigma = alpha_sigma(expand_gamma(gamma_t, jnp.ndim(z_t)))
    return (alpha * z_t - x_hat) / sigma


def score_from_eps(eps_hat: Array, gamma_t: Array) -> Array:
    """The score of q(z_t), grad_z log q(z_t) = -eps_hat / sigma_t; ``eps_hat.shape``."""
    _, sigma = alpha_sigma(expand_gamma(gamma_t, jnp.ndim(eps_hat)))
    return -eps_hat / sigma


def eps_from_score(score: Array, gamma_t: Array) -> Array:
    """eps_hat = -sigma_t score, the inverse of :func:`score_from_eps`; ``score.shape``."""
    _, sigma = alpha_sigma(expand_gamma(gamma_t, jnp.ndim(score)))
    return -sigma * score


def to_eps(prediction: Array, z_t: Array, gamma_t: Array, parameterization: str) -> Array:
    """The noise prediction eps_hat from a network's output in any parameterisation.

    Args:
      prediction: the output, float ``[B, ...]``: eps_hat, x_hat or v_hat.
      z_t: the latent it was computed from, ``prediction.shape``.
      gamma_t: scalar or a prefix of ``z_t.shape``.
      parameterization: ``"eps"``, ``"x"`` or ``"v"``.

    Returns:
      eps_hat, ``z_t.shape``.
    """
    return _conversion(_TO_EPS, parameterization)(z_t, prediction, gamma_t)


def from_eps(eps_hat: Array, z_t: Array, gamma_t: Array, parameterization: str) -> Array:
    """The inverse of :func:`to_eps`: eps_hat expressed as an eps, x or v prediction."""
    return _conversion(_FROM_EPS, parameterization)(z_t, eps_hat, gamma_t)


def _conversion(table, parameterization: str):
    if parameterization not in table:
        raise UserError(
            f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}"
        )
    return table[parameterization]


# (z_t, prediction, gamma_t) -> eps_hat, and its inverse (z_t, eps_hat, gamma_t) -> prediction.
_TO_EPS = {"eps": lambda z_t, eps, gamma_t: eps, "v": eps_from_v, "x": eps_from_x}
_FROM_EPS = {"eps": lambda z_t, eps, gamma_t: eps, "v": v_from_eps, "x": predict_x}


def ancestral_step(
    z_t: Array, eps_hat: Array, gamma_s: Array, gamma_t: Array, noise: Array
) -> Array:
    """One step of the generative model, a sample of p(z_s|z_t) = q(z_s|z_t, x = x_hat).

    With x_hat from :func:`predict_x`, the posterior mean simplifies to
    (alpha_s / alpha_t) (z_t - c sigma_t eps_hat), which avoids dividing by alpha_t twice.

    Args:
      z_t: latent at time t, float ``[B, ...]``; eps_hat: predicted noise, same shape.
      gamma_s, gamma_t: scalars or prefixes of ``z_t.shape``, gamma_s < gamma_t.
      noise: standard normal, ``z_t.shape``.

    Returns:
      z_s, ``z_t.shape``.
    """
    ndim = jnp.ndim(z_t)
    gamma_s, gamma_t = expand_gamma(gamma_s, ndim), expand_gamma(gamma_t, ndim)
    ratio, c, var = _posterior_coefs(gamma_s, gamma_t)
    _, sigma_t = alpha_sigma(gamma_t)
    return ratio * (z_t - c * sigma_t * eps_hat) + jnp.sqrt(var) * noise


def encode(x_int: Array, vocab_size: int) -> Array:
    """Map integer data 0..V-1 to the centres of V equal bins of [-1, 1]: 2 (x + 1/2) / V - 1.

    Args:
      x_int: integer array (e.g. uint8 images ``[B, H, W, C]``), values in 0..vocab_size-1.
      vocab_size: V, the number of values (256 for 8-bit images).

    Returns:
      float32 array, ``x_int.shape``.
    """
    if vocab_size < 2:
        raise UserError(f"vocab_size must be at least 2, got {vocab_size}")
    return (2.0 * (jnp.asarray(x_int, jnp.float32) + 0.5)) / vocab_size - 1.0
