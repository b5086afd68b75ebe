"""Discrete-time samplers of a VDM: ancestral, DDIM and DPM-Solver.

Every public function takes ``(model, params, key, ...)`` where ``model`` and ``params`` are
as :mod:`vdm_jax.models.protocol` describes (a :class:`vdm_jax.models.vdm.VDM` and its
variables). Each public function is one
``jax.jit`` whose static arguments are the model and the integer / string / float settings
(shapes, step counts, tolerances, modes); arrays (``params``, ``key``, ``labels``,
``images``, ``z_0``) are traced, so a new key or new parameters never retrace. The model must be
hashable (Linen modules are); ``shape`` must be a tuple. Results are deterministic given
``key``. There are no Python loops over steps: the discrete samplers use ``lax.fori_loop`` and
the ODE ones (:mod:`vdm_jax.models.ode`) diffrax's adaptive solvers.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.maths import diffusion
from vdm_jax.models import protocol

Array = jax.Array

__all__ = ["StepProgress", "ancestral_sample", "ddim_sample", "dpm_solver_sample"]


def _gamma_grid(model: nn.Module, params, num_steps: int) -> Array:
    """gamma(i / T) for i = 0..T, ``[T + 1]`` float32 (exactly the endpoints at 0 and T)."""
    return protocol.gamma(model, params, jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps)


class StepProgress:
    """A sampler's progress bar (tqdm, shown on a terminal), advanced once per step.

    A sampler given ``progress=True`` makes one when it is traced; pass an instance of your
    own (or of a subclass, e.g. one that records the steps) as ``progress`` to keep it. It is
    called on the host through :func:`jax.debug.callback` with the step ``j`` and the step
    count: it opens a bar at step 0 and closes it after the last step.
    """

    def __init__(self, desc: str = "sampling"):
        self.desc = desc
        self._bar = None

    @property
    def is_open(self) -> bool:
        """Whether a bar is shown (between a sampler's first and last steps)."""
        return self._bar is not None

    def __call__(self, j, total) -> None:
        j, total = int(j), int(total)
        if j == 0:
            from tqdm import tqdm

            self.close()
            self._bar = tqdm(total=total, desc=self.desc, unit="step", disable=None)
        if self._bar is not None:
            self._bar.update(1)
            if j == total - 1:
                self.close()

    def close(self) -> None:
        """Close the bar, if one is open."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _loop(body, num_steps: int, progress: bool | StepProgress, carry):
    """``fori_loop(0, num_steps, body, carry)``; with ``progress``, also a progress bar."""
    if progress:
        report = StepProgress() if progress is True else progress
        plain = body

        def body(j, carry):
            jax.debug.callback(report, j, num_steps)
            return plain(j, carry)

    return jax.lax.fori_loop(0, num_steps, body, carry)


# ----------------------------------------------------------------------------------------------
# Discrete-time samplers


_STATIC = ("model", "shape", "num_steps", "decode", "return_latent", "progress")


@functools.partial(jax.jit, static_argnames=_STATIC)
def ancestral_sample(
    model: nn.Module,
    params,
    key: Array,
    *,
    shape: tuple[int, int, int, int],
    num_steps: int,
    labels: Array | None = None,
    decode: str = "argmax",
    return_latent: bool = False,
    progress: bool | StepProgress = False,
) -> Array | tuple[Array, Array]:
    """The paper's ancestral sampler of the discrete-time generative model p(z_s|z_t).

    z_1 ~ N(0, I); then for i = T, ..., 1 with t = i/T, s = (i - 1)/T:
    z_s = :func:`vdm_jax.maths.diffusion.ancestral_step` (z_t, eps_hat(z_t, gamma_t), gamma_s,
    gamma_t, noise), a sample of q(z_s|z_t, x = x_hat); finally z_0 is decoded to integers with
    ``model.decode_log_probs``. One network evaluation per step.

    Args:
      model: a VDM-like Linen module (see the module docstring); static.
      params: its variables dict.
      key: a PRNG key; the same key gives the same samples, and every sampler given the same
        key starts from the same z_1.
      shape: ``(B, H, W, C)``, a tuple of ints; static.
      num_steps: T >= 1; static.
      labels: int ``[B]`` class labels for a class-conditional model, or None.
      decode: ``"argmax"`` (the most likely value of p(x|z_0)) or ``"sample"`` (a sample of
        it); static.
      return_latent: also return z_0; static.
      progress: show a progress bar of the steps (tqdm, on a terminal): True, or a
        :class:`StepProgress` of your own; static.

    Returns:
      images, int32 ``shape`` with values in 0..V-1; with ``return_latent``, the pair
      ``(images, z_0)`` with z_0 float32 ``shape``.
    """
    shape, z_1, key_steps, key_decode = protocol.begin(key, shape, num_steps, decode)
    gammas = _gamma_grid(model, params, num_steps)

    def body(j, z_t):
        i = num_steps - j  # T, T-1, ..., 1
        gamma_t, gamma_s = gammas[i], gammas[i - 1]
        eps_hat = protocol.eps_hat(model, params, z_t, gamma_t, labels)
        noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, jnp.float32)
        return diffusion.ancestral_step(z_t, eps_hat, gamma_s, gamma_t, noise)

    z_0 = _loop(body, num_steps, progress, z_1)
    return protocol.finish(model, params, z_0, key_decode, decode, return_latent)


@functools.partial(jax.jit, static_argnames=_STATIC)
def ddim_sample(
    model: nn.Module,
    params,
    key: Array,
    *,
    shape: tuple[int, int, int, int],
    num_steps: int,
    labels: Array | None = None,
    decode: str = "argmax",
    return_latent: bool = False,
    progress: bool | StepProgress = False,
) -> Array | tuple[Array, Array]:
    """The deterministic DDIM sampler (eta = 0), usually with far fewer steps than ancestral.

    z_1 ~ N(0, I); then for i = T, ..., 1 with t = i/T, s = (i - 1)/T:
    x_hat = :func:`vdm_jax.maths.diffusion.predict_x` (z_t, eps_hat, gamma_t) and
    z_s = alpha_s x_hat + sigma_s eps_hat (a first-order step of the probability-flow ODE in the
    variable z / alpha); z_0 is decoded as in :func:`ancestral_sample`. The only randomness is
    z_1 (and the decoder with ``decode="sample"``). One network evaluation per step.

    Args:
      model, params, key, shape, num_steps, labels, decode, return_latent, progress: as in
        :func:`ancestral_sample`.

    Returns:
      images, int32 ``shape`` in 0..V-1; with ``return_latent``, ``(images, z_0)``.
    """
    shape, z_1, _, key_decode = protocol.begin(key, shape, num_steps, decode)
    gammas = _gamma_grid(model, params, num_steps)

    def body(j, z_t):
        i = num_steps - j
        gamma_t, gamma_s = gammas[i], gammas[i - 1]
        eps_hat = protocol.eps_hat(model, params, z_t, gamma_t, labels)
        x_hat = diffusion.predict_x(z_t, eps_hat, gamma_t)
        alpha_s, sigma_s = diffusion.alpha_sigma(gamma_s)
        return alpha_s * x_hat + sigma_s * eps_hat

    z_0 = _loop(body, num_steps, progress, z_1)
    return protocol.finish(model, params, z_0, key_decode, decode, return_latent)


@functools.partial(
    jax.jit,
    static_argnames=(*_STATIC, "stochastic"),
)
def dpm_solver_sample(
    model: nn.Module,
    params,
    key: Array,
    *,
    shape: tuple[int, int, int, int],
    num_steps: int,
    stochastic: bool = False,
    labels: Array | None = None,
    decode: str = "argmax",
    return_latent: bool = False,
    progress: bool | StepProgress = False,
) -> Array | tuple[Array, Array]:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2) in log-SNR, and its
    stochastic variant SDE-DPM-Solver++(2M).

    A second-order multistep solver of the probability-flow ODE written for the data
    prediction x_hat = :func:`vdm_jax.maths.diffusion.predict_x`. With lambda = log(alpha / sigma) =
    -gamma / 2 on ``num_steps + 1`` levels equally spaced in lambda from gamma(1) to gamma(0)
    (only the schedule's endpoints matter: the network is conditioned on gamma itself), step
    i from level s to the less noisy level t, h = lambda_t - lambda_s, is

        z_t = (sigma_t / sigma_s) z_s - alpha_t expm1(-h) D,   D = (1 + 1/(2r)) x_i - x_{i-1} / (2r)

    with r = h_{i-1} / h and x_i, x_{i-1} the data predictions at this level and the previous
    one (D = x_i at the first step: DDIM). The stochastic variant, from the SDE of the same
    marginals, is z_t = (sigma_t / sigma_s) e^{-h} z_s - alpha_t expm1(-2h) D +
    sigma_t sqrt(-expm1(-2h)) noise. One network evaluation per step; the deterministic
    solver's global error falls as 1 / num_steps^2.

    Args:
      model, params, key, shape, labels, decode, return_latent, progress: as in
        :func:`ancestral_sample`.
      num_steps: steps = network evaluations, >= 1; static.
      stochastic: the SDE variant; static.

    Returns:
      images, int32 ``shape`` in 0..V-1; with ``return_latent``, ``(images, z_0)``.
    """
    shape, z_1, key_steps, key_decode = protocol.begin(key, shape, num_steps, decode)
    gamma_0, gamma_1 = protocol.endpoints(model, params)
    gammas = jnp.linspace(gamma_1, gamma_0, num_steps + 1)  # noisiest first, equal in lambda

    def body(i, carry):
        z_s, x_prev, h_prev = carry
        gamma_s, gamma_t = gammas[i], gammas[i + 1]
        x_hat = diffusion.predict_x(
            z_s, protocol.eps_hat(model, params, z_s, gamma_s, labels), gamma_s
        )
        h = 0.5 * (gamma_s - gamma_t)
        half_inverse_r = jnp.where(i > 0, 0.5 * h / h_prev, 0.0)
        d = (1.0 + half_inverse_r) * x_hat - half_inverse_r * x_prev
        alpha_t, sigma_t = diffusion.alpha_sigma(gamma_t)
        # sigma_t / sigma_s without forming either ratio's terms by subtraction.
        sigma_ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(gamma_t) - jax.nn.log_sigmoid(gamma_s)))
        if stochastic:
            noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, jnp.float32)
            z_t = (
                sigma_ratio * jnp.exp(-h) * z_s
                - alpha_t * jnp.expm1(-2.0 * h) * d
                + sigma_t * jnp.sqrt(-jnp.expm1(-2.0 * h)) * noise
            )
        else:
            z_t = sigma_ratio * z_s - alpha_t * jnp.expm1(-h) * d
        return z_t, x_hat, h

    carry = (z_1, jnp.zeros(shape, jnp.float32), jnp.ones((), jnp.float32))
    z_0, _, _ = _loop(body, num_steps, progress, carry)
    return protocol.finish(model, params, z_0, key_decode, decode, return_latent)
