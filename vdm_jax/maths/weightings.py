"""Weightings of the diffusion bound and adaptive noise-level distributions.

Kingma & Gao, "Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation"
(NeurIPS 2023, arXiv 2303.00848) write the usual diffusion objectives as weighted versions of
the VDM diffusion loss. With lambda = log SNR = -gamma (nats of log signal-to-noise ratio):

    L_w(x) = 1/2 E_{t ~ U(0, 1), eps}[w(lambda_t) (-dlambda/dt) ||eps - eps_hat(z_t)||^2]
           = 1/2 int_{lambda_min}^{lambda_max} w(lambda) E||eps - eps_hat(z_lambda)||^2 dlambda,

their weighted loss. w = 1 is the diffusion term of the ELBO. The second line shows
that L_w does not depend on the schedule lambda_t except through its endpoints. Where w is
monotone, i.e. non-increasing in lambda (non-decreasing in t), integrating by parts gives
their main result: with L(lambda; x) = 1/2 int_{lambda_min}^{lambda} E||eps - eps_hat||^2
dlambda' the ELBO's diffusion loss over the levels noisier than lambda (the ELBO of the data
noised to level lambda, up to terms constant in the model),

    L_w(x) = w(lambda_max) L(lambda_max; x) + int (-dw/dlambda) L(lambda; x) dlambda,

a mixture of ELBOs of the data augmented with Gaussian noise at level lambda (plus a point mass
at lambda_max): training a monotone weighting is maximum likelihood under that data
augmentation.

Every weighting here is a :class:`Weighting`, a hashable callable ``w(lambda)`` (elementwise,
float32 in and out), made by :func:`get_weighting`. The constant factor of a weighting is
arbitrary: it rescales the loss (and the learning rate's effect), not the optimum.

The second half of the module is the noise-level distribution p(lambda) that may replace
the schedule's uniform t (their adaptive noise schedule): importance sampling
L_w = 1/2 E_{lambda ~ p}[w(lambda) / p(lambda) ||eps - eps_hat||^2] is unbiased for any p > 0
on [lambda_min, lambda_max], and its variance is least for p(lambda) proportional to
w(lambda) E||eps - eps_hat||^2. :func:`histogram_probs`, :func:`sample_from_histogram` and
:func:`update_histogram` estimate that density online as a histogram with an exponential moving
average.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.errors import UserError

Array = jax.Array

__all__ = [
    "WEIGHTINGS",
    "Weighting",
    "get_weighting",
    "histogram_probs",
    "register_weighting",
    "sample_from_histogram",
    "unregister_weighting",
    "update_histogram",
]


@dataclasses.dataclass(frozen=True)
class Weighting:
    """A weighting w(lambda) of the diffusion loss, a function of lambda = log SNR.

    Equal and hashable by ``(name, params)``, so it can be a static argument of ``jax.jit`` or a
    field of a Linen module.

    Attributes:
      name: the weighting's name in :data:`WEIGHTINGS`.
      params: its parameters, a tuple of ``(name, value)`` pairs (floats).
      monotone: whether w is non-increasing in lambda, which makes L_w an ELBO of
        noise-augmented data (Kingma & Gao 2023).
      fn: the function itself, lambda (float array, any shape) -> w (same shape, float32).
    """

    name: str
    params: tuple[tuple[str, float], ...]
    monotone: bool
    fn: Callable[[Array], Array] = dataclasses.field(compare=False, hash=False, repr=False)

    def __call__(self, lam: Array) -> Array:
        """w(lambda), elementwise, ``lam.shape``, float32."""
        return self.fn(jnp.asarray(lam, jnp.float32))

    @property
    def is_elbo(self) -> bool:
        """True for w = 1, the ELBO's own diffusion term."""
        return self.name == "elbo"


def _elbo() -> Callable[[Array], Array]:
    return jnp.ones_like


def _sigmoid(bias: float = 0.0) -> Callable[[Array], Array]:
    return lambda lam: jax.nn.sigmoid(bias - lam)


def _edm_log_weight(lam, sigma_data, p_mean, p_std):
    """log of EDM's weighting in lambda, in float64 numpy or float32 jnp alike."""
    xp = jnp if isinstance(lam, jax.Array) else np
    mean, std = -2.0 * p_mean, 2.0 * p_std
    log_density = -0.5 * ((lam - mean) / std) ** 2 - math.log(std * math.sqrt(2.0 * math.pi))
    # log((e^-lambda + sigma_data^2) / sigma_data^2), written without overflow for lambda << 0.
    return log_density + xp.logaddexp(-lam, 2.0 * math.log(sigma_data)) - 2.0 * math.log(sigma_data)


def _edm(
    sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2
) -> Callable[[Array], Array]:
    return lambda lam: jnp.exp(_edm_log_weight(lam, sigma_data, p_mean, p_std))


def _edm_argmax(sigma_data: float, p_mean: float, p_std: float) -> float:
    """The lambda at which EDM's weighting is largest (float64 grid search, then refinement)."""
    mean, std = -2.0 * p_mean, 2.0 * p_std
    grid = np.linspace(mean - 12.0 * std, mean + 12.0 * std, 200_001)
    i = int(np.argmax(_edm_log_weight(grid, sigma_data, p_mean, p_std)))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    for _ in range(60):  # golden-section search on the bracketing cell
        a, b = hi - 0.618034 * (hi - lo), lo + 0.618034 * (hi - lo)
        if _edm_log_weight(a, sigma_data, p_mean, p_std) > _edm_log_weight(
            b, sigma_data, p_mean, p_std
        ):
            hi = b
        else:
            lo = a
    return float(0.5 * (lo + hi))


def _edm_monotonic(
    sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2
) -> Callable[[Array], Array]:
    peak = _edm_argmax(sigma_data, p_mean, p_std)
    # Clamping lambda from below holds w at its maximum on the noisy side of the peak.
    return lambda lam: jnp.exp(_edm_log_weight(jnp.maximum(lam, peak), sigma_data, p_mean, p_std))


def _v_mse() -> Callable[[Array], Array]:
    return lambda lam: jnp.exp(-0.5 * lam)


def _min_snr(gamma: float = 5.0) -> Callable[[Array], Array]:
    log_gamma = math.log(gamma)
    # sech(lambda / 2) = 2 / (e^{lambda/2} + e^{-lambda/2}); min(1, gamma / SNR) in logs.
    return lambda lam: jnp.exp(
        math.log(2.0) - jnp.logaddexp(0.5 * lam, -0.5 * lam) + jnp.minimum(0.0, log_gamma - lam)
    )


#: The weightings by name: name -> (factory, whether w(lambda) is monotone, a one-line
#: description). Read it; add to it with :func:`register_weighting`.
WEIGHTINGS: dict[str, tuple[Callable[..., Callable[[Array], Array]], bool, str]] = {
    "elbo": (_elbo, True, "w = 1: the ELBO itself (VDM)."),
    "sigmoid": (
        _sigmoid,
        True,
        "w = sigmoid(bias - lambda) (Kingma & Gao 2023): about 1 at high noise, "
        "decaying like e^{bias - lambda} once lambda exceeds the bias. Param: bias (0).",
    ),
    "edm": (
        _edm,
        False,
        "Karras et al. 2022 (EDM) as a weighting (Kingma & Gao 2023): "
        "w = N(lambda; -2 p_mean, (2 p_std)^2) (e^{-lambda} + sigma_data^2) / sigma_data^2, the "
        "density of EDM's log-normal noise levels (lambda = -2 log sigma) times its loss "
        "weight in the eps-error. Params: sigma_data (0.5), p_mean (-1.2), p_std (1.2).",
    ),
    "edm_monotonic": (
        _edm_monotonic,
        True,
        "EDM's weighting held at its maximum for every lambda below its arg-max (Kingma & Gao "
        "2023), so non-increasing in lambda. Params as edm.",
    ),
    "v_mse": (
        _v_mse,
        True,
        "w = e^{-lambda/2}: v-prediction's loss ||v - v_hat||^2 = (1 + e^{-lambda}) ||eps - "
        "eps_hat||^2 at uniform t of the cosine schedule, whose density in lambda is "
        "sech(lambda/2) / (2 pi) (Salimans & Ho 2022; Kingma & Gao 2023), up to "
        "a constant factor.",
    ),
    "min_snr": (
        _min_snr,
        False,
        "Min-SNR-gamma (Hang et al. 2023) for eps-prediction at uniform t of the cosine "
        "schedule: w = sech(lambda/2) min(1, gamma e^{-lambda}), up to a constant factor. "
        "Param: gamma (5).",
    ),
}


_BUILT_IN = frozenset(WEIGHTINGS)


def register_weighting(
    name: str, factory: Callable[..., Callable[[Array], Array]], *, monotone: bool, description: str
) -> None:
    """Adds a weighting under ``name``: :func:`get_weighting` builds it and a config's
    ``objective.weighting`` accepts the name.

    Args:
      name: a new name (not one of :data:`WEIGHTINGS`).
      factory: takes the weighting's parameters as keyword arguments, each with a float default,
        and returns w(lambda), a function of lambda = log SNR (float32 array, any shape) to a
        positive float32 array of the same shape. A config passes a parameter of the same name
        as an ``objective`` field (``bias``, ``sigma_data``, ``p_mean``, ``p_std``, and
        ``gamma`` from ``objective.snr_gamma``); any other takes its default.
      monotone: whether w(lambda) is non-increasing in lambda (Kingma & Gao 2023: then the
        weighted loss is an ELBO of noise-augmented data).
      description: one line for listings.

    Raises:
      UserError: the name is taken, or the factory is not callable or has a parameter without
        a numeric default.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"register_weighting: the name must be a non-empty string, got {name!r}")
    if name in WEIGHTINGS:
        raise UserError(f"register_weighting: the weighting {name!r} is already registered")
    if not callable(factory):
        raise UserError(f"register_weighting: the factory of {name!r} is not callable: {factory!r}")
    for p in inspect.signature(factory).parameters.values():
        if not isinstance(p.default, numbers.Real) or isinstance(p.default, bool):
            raise UserError(
                f"register_weighting: parameter {p.name!r} of {name!r} needs a float default "
                "(a weighting's parameters are keyword floats)"
            )
    WEIGHTINGS[name] = (factory, bool(monotone), str(description))


def unregister_weighting(name: str) -> None:
    """Removes a weighting added by :func:`register_weighting`.

    Raises:
      UserError: ``name`` was not registered, or is one of the built-in weightings.
    """
    if name in _BUILT_IN or name not in WEIGHTINGS:
        raise UserError(f"unregister_weighting: {name!r} is not a registered weighting")
    del WEIGHTINGS[name]


def get_weighting(name: str, **params: float) -> Weighting:
    """The weighting ``name`` with the given parameters.

    Known weightings (lambda = log SNR = -gamma; monotone = non-increasing in lambda):

    * ``elbo`` (monotone): w = 1.
    * ``sigmoid`` (monotone): w = sigmoid(bias - lambda); ``bias`` (default 0) shifts the
      weight towards noisier levels as it decreases.
    * ``edm`` (not monotone): w = N(lambda; -2 p_mean, (2 p_std)^2) (e^{-lambda} +
      sigma_data^2) / sigma_data^2; defaults sigma_data = 0.5, p_mean = -1.2, p_std = 1.2.
    * ``edm_monotonic`` (monotone): ``edm`` held at its maximum below its arg-max.
    * ``v_mse`` (monotone): w = e^{-lambda/2}, the weighting of v-prediction's MSE with the
      cosine schedule.
    * ``min_snr`` (not monotone): w = sech(lambda/2) min(1, gamma e^{-lambda}), Min-SNR-gamma
      with the cosine schedule; default gamma = 5.

    Args:
      name: one of :data:`WEIGHTINGS`.
      **params: the weighting's parameters (floats).

    Returns:
      A :class:`Weighting`.

    Raises:
      UserError: for an unknown name or parameter, or a non-positive scale parameter.
    """
    if name not in WEIGHTINGS:
        raise UserError(f"unknown weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    factory, monotone, _ = WEIGHTINGS[name]
    known = inspect.signature(factory).parameters
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise UserError(
            f"weighting {name!r} has no parameter(s) {unknown}; its parameters are {list(known)}"
        )
    values = {k: float(v.default) for k, v in known.items()}
    values.update({k: float(v) for k, v in params.items()})
    for key in ("sigma_data", "p_std", "gamma"):
        if key in values and not values[key] > 0:
            raise UserError(f"weighting {name!r} needs {key} > 0, got {values[key]}")
    return Weighting(name, tuple(sorted(values.items())), monotone, factory(**values))


# ----------------------------------------------------------------------------------------------
# Adaptive noise levels: a histogram density over [gamma_0, gamma_1]


def histogram_probs(histogram: Array, floor: float) -> Array:
    """Bin probabilities from a histogram of E[w ||eps - eps_hat||^2], with a floor.

    p_i = (1 - floor) h_i / sum(h) + floor / K, so that every bin keeps at least floor / K of
    the mass whatever the estimate says: the importance weights w / p stay bounded by
    K / floor times w, and the estimator stays unbiased.

    Args:
      histogram: non-negative ``[K]`` float32 (any scale; all zeros gives the uniform density).
      floor: in (0, 1]; 1 is the uniform density.

    Returns:
      ``[K]`` float32 probabilities summing to 1.
    """
    if not 0.0 < floor <= 1.0:
        raise UserError(f"the noise-level floor must be in (0, 1], got {floor}")
    histogram = jnp.maximum(jnp.asarray(histogram, jnp.float32), 0.0)
    num_bins = histogram.shape[-1]
    total = jnp.sum(histogram)
    shares = jnp.where(total > 0, histogram / jnp.where(total > 0, total, 1.0), 1.0 / num_bins)
    return (1.0 - floor) * shares + floor / num_bins


def sample_from_histogram(
    probs: Array, gamma_0: Array, gamma_1: Array, u: Array
) -> tuple[Array, Array, Array]:
    """Noise levels from the piecewise-uniform density of ``probs`` over [gamma_0, gamma_1].

    The K bins split [gamma_0, gamma_1] into equal parts (gamma = -lambda, so bin 0 is the
    least noisy); gamma is the inverse CDF at ``u``, so stratified or antithetic ``u`` stays
    stratified. It is a piecewise-linear schedule gamma(u) whose derivative is 1 / p(gamma):
    :func:`vdm_jax.maths.losses.weighted_diffusion_loss` with ``dgamma_dt = 1 / density`` is the
    importance-sampled loss. gamma depends differentiably on the endpoints.

    Args:
      probs: ``[K]`` float32 bin probabilities (see :func:`histogram_probs`), all positive.
      gamma_0, gamma_1: the schedule's endpoints gamma(0) < gamma(1), float32 scalars.
      u: uniforms in [0, 1), float32 ``[B]``.

    Returns:
      ``(gamma, density, bins)``: gamma ``[B]`` float32; the density p(gamma) = p(lambda)
      ``[B]`` float32 (per unit of gamma); the bin of each sample, int32 ``[B]``.
    """
    probs = jnp.asarray(probs, jnp.float32)
    num_bins = probs.shape[-1]
    cdf = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(probs)])
    u = jnp.asarray(u, jnp.float32) * cdf[-1]  # cdf[-1] is 1 up to rounding
    bins = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, num_bins - 1)
    within = jnp.clip((u - cdf[bins]) / probs[bins], 0.0, 1.0)
    span = gamma_1 - gamma_0
    gamma = gamma_0 + span * ((bins + within) / num_bins)
    density = probs[bins] * num_bins / span
    return gamma, density, bins.astype(jnp.int32)


def update_histogram(
    histogram: Array,
    bins: Array,
    values: Array,
    decay: float,
    axis_name: str | None = None,
) -> Array:
    """One EMA step of the histogram of E[w(lambda) ||eps - eps_hat||^2] per bin.

    Each bin's batch mean of ``values`` replaces a fraction 1 - decay of its estimate; bins
    without a sample this step keep theirs. The means are over the global batch: under
    ``jit`` with sharded arrays that is automatic, under ``pmap`` pass the mapped axis name.

    Args:
      histogram: ``[K]`` float32, the current estimate.
      bins: int ``[B]``, the bin of each example (from :func:`sample_from_histogram`).
      values: float ``[B]``, w(lambda_i) ||eps_i - eps_hat_i||^2 per example (any fixed scale).
      decay: in [0, 1).
      axis_name: the ``pmap`` axis to average over, or None.

    Returns:
      The new ``[K]`` float32 histogram.
    """
    if not 0.0 <= decay < 1.0:
        raise UserError(f"the noise-level EMA decay must be in [0, 1), got {decay}")
    num_bins = histogram.shape[-1]
    one_hot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32)  # [B, K]
    sums = jnp.einsum("bk,b->k", one_hot, jnp.asarray(values, jnp.float32))
    counts = jnp.sum(one_hot, axis=0)
    if axis_name is not None:
        sums, counts = jax.lax.psum((sums, counts), axis_name)
    means = sums / jnp.maximum(counts, 1.0)
    updated = decay * histogram + (1.0 - decay) * means
    return jnp.where(counts > 0, updated, histogram)
