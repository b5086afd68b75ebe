"""Samplers and the probability-flow likelihood of a VDM.

Every public function takes ``(model, params, key, ...)`` where ``model`` is any Linen module
with the methods of :class:`vdm_jax.models.vdm.VDM` that sampling needs:

* ``gamma(t)``: gamma = -log SNR at times ``t`` (any shape) in [0, 1], float32;
* ``endpoints()``: ``(gamma(0), gamma(1))``, float32 scalars;
* ``predict_noise(z, gamma_t, labels, train=False)``: eps_hat, ``z.shape`` float32, for z
  ``[B, H, W, C]`` and gamma_t ``[B]``;
* ``decode_log_probs(z_0)``: log p(x|z_0), ``z_0.shape + (V,)``;
* the field ``vocab_size`` (V);

and ``params`` is its variables dict (``{"params": ...}``). Each public function is one
``jax.jit`` whose static arguments are the model and the integer / string / float settings
(shapes, step counts, tolerances, modes); arrays (``params``, ``key``, ``labels``,
``images``, ``z_0``) are traced, so a new key or new parameters never retrace. The model must be
hashable (Linen modules are); ``shape`` must be a tuple. Results are deterministic given
``key``. There are no Python loops over steps: the discrete samplers use ``lax.fori_loop`` and
the ODE ones diffrax's adaptive solvers.

The probability-flow ODE, in the gamma parameterisation. For q(z_t|x) = N(alpha_t x,
sigma_t^2 I) with alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t), the forward SDE
dz = f(t) z dt + g(t) dw has::

    f(t)   = d log alpha_t / dt = 1/2 d log sigmoid(-gamma_t) / dt = -1/2 gamma'(t) sigma_t^2,
    g^2(t) = d sigma_t^2 / dt - 2 f(t) sigma_t^2
           = gamma'(t) sigma_t^2 alpha_t^2 + gamma'(t) sigma_t^4 = gamma'(t) sigma_t^2,

and with the score -eps_hat / sigma_t the ODE dz/dt = f z - 1/2 g^2 score is::

    dz/dt = 1/2 gamma'(t) sigma_t (eps_hat(z, t) - sigma_t z).

Its divergence is 1/2 gamma'(t) sigma_t tr(d eps_hat / dz - sigma_t I), estimated with
Hutchinson's v^T (d eps_hat/dz - sigma_t I) v. Nothing here forms 1 - alpha^2 by subtraction.

The ODE solvers integrate each example separately (``jax.vmap`` over the batch): each example
gets its own adaptive step sizes and tolerance test, so an example's result does not depend on
the rest of the batch, and the number of function evaluations (NFE) is reported per example.
The batch runs in lock-step, so the cost of a call is that of the example with the largest NFE.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, NamedTuple

import diffrax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError
from vdm_jax.maths import diffusion, losses, schedules

Array = jax.Array

__all__ = [
    "ODELikelihood",
    "ancestral_sample",
    "ddim_sample",
    "dpm_solver_sample",
    "ode_log_likelihood",
    "ode_log_prob_latent",
    "ode_sample",
    "probability_flow_drift",
    "solve_probability_flow",
]

_DECODE_MODES = ("argmax", "sample")
_HUTCHINSON = ("rademacher", "gaussian")
_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
# Tsit5 and Dopri5 have 7 stages, the first equal to the last of the previous step (FSAL): one
# evaluation to start, then 6 per step attempted (accepted or rejected).
_NFE_PER_STEP = 6
_INITIAL_DT = 0.01  # First step, as a fraction of |t1 - t0|; the controller adapts it.


# ----------------------------------------------------------------------------------------------
# Small helpers


def _check_shape(shape) -> tuple[int, int, int, int]:
    try:
        dims = tuple(operator.index(n) for n in shape)
    except TypeError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise UserError(f"shape must be a tuple of 4 positive ints (B, H, W, C), got {shape!r}")
    return dims


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_positive(name: str, value) -> None:
    if not value > 0:
        raise UserError(f"{name} must be positive, got {value!r}")


def _gamma(model: nn.Module, params, t: Array) -> Array:
    return model.apply(params, t, method="gamma")


def _endpoints(model: nn.Module, params) -> tuple[Array, Array]:
    return model.apply(params, method="endpoints")


def _eps_hat(model: nn.Module, params, z: Array, gamma_t: Array, labels: Array | None) -> Array:
    """eps_hat for z ``[B, ...]`` at a scalar gamma_t (broadcast to ``[B]``)."""
    gamma_b = jnp.broadcast_to(jnp.asarray(gamma_t, jnp.float32), (z.shape[0],))
    return model.apply(params, z, gamma_b, labels, train=False, method="predict_noise")


def _decode(model: nn.Module, params, z_0: Array, key: Array, decode: str) -> Array:
    """Integers 0..V-1, ``z_0.shape`` int32: argmax or a sample of p(x|z_0)."""
    log_probs = model.apply(params, z_0, method="decode_log_probs")
    if decode == "argmax":
        return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32)


def _sum_per_example(values: Array) -> Array:
    return jnp.sum(values, axis=tuple(range(1, values.ndim)))


def _gamma_grid(model: nn.Module, params, num_steps: int) -> Array:
    """gamma(i / T) for i = 0..T, ``[T + 1]`` float32 (exactly the endpoints at 0 and T)."""
    return _gamma(model, params, jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps)


_BARS: dict[int, Any] = {}


def _advance(j, total) -> None:
    """Host side of a sampler's progress bar: opened at step 0, closed after the last."""
    j, total = int(j), int(total)
    if j == 0:
        from tqdm import tqdm

        _BARS[total] = tqdm(total=total, desc="sampling", unit="step", disable=None)
    bar = _BARS.get(total)
    if bar is not None:
        bar.update(1)
        if j == total - 1:
            _BARS.pop(total).close()


def _begin(key: Array, shape, num_steps: int | None, decode: str):
    """Checks a sampler's settings; returns the shape, z_1 ~ N(0, I) and the keys of the steps'
    noise and the decoder. z_1 depends on the key alone, so that every sampler given the same
    key starts from the same noise."""
    shape = _check_shape(shape)
    if num_steps is not None:
        _check_positive("num_steps", num_steps)
    _check_choice("decode", decode, _DECODE_MODES)
    key_init, key_rest = jax.random.split(key)
    key_steps, key_decode = jax.random.split(key_rest)
    return shape, jax.random.normal(key_init, shape, jnp.float32), key_steps, key_decode


def _loop(body, num_steps: int, progress: bool, carry):
    """``fori_loop(0, num_steps, body, carry)``; with ``progress``, also a progress bar."""
    if progress:
        plain = body

        def body(j, carry):
            jax.debug.callback(_advance, j, num_steps)
            return plain(j, carry)

    return jax.lax.fori_loop(0, num_steps, body, carry)


def _finish(model, params, z_0, key, decode, return_latent):
    images = _decode(model, params, z_0, key, decode)
    return (images, z_0) if return_latent else images


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
    progress: bool = False,
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
      progress: show a progress bar of the steps (tqdm, on a terminal); static.

    Returns:
      images, int32 ``shape`` with values in 0..V-1; with ``return_latent``, the pair
      ``(images, z_0)`` with z_0 float32 ``shape``.
    """
    shape, z_1, key_steps, key_decode = _begin(key, shape, num_steps, decode)
    gammas = _gamma_grid(model, params, num_steps)

    def body(j, z_t):
        i = num_steps - j  # T, T-1, ..., 1
        gamma_t, gamma_s = gammas[i], gammas[i - 1]
        eps_hat = _eps_hat(model, params, z_t, gamma_t, labels)
        noise = jax.random.normal(jax.random.fold_in(key_steps, i), shape, jnp.float32)
        return diffusion.ancestral_step(z_t, eps_hat, gamma_s, gamma_t, noise)

    z_0 = _loop(body, num_steps, progress, z_1)
    return _finish(model, params, z_0, key_decode, decode, return_latent)


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
    progress: bool = False,
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
    shape, z_1, _, key_decode = _begin(key, shape, num_steps, decode)
    gammas = _gamma_grid(model, params, num_steps)

    def body(j, z_t):
        i = num_steps - j
        gamma_t, gamma_s = gammas[i], gammas[i - 1]
        eps_hat = _eps_hat(model, params, z_t, gamma_t, labels)
        x_hat = diffusion.predict_x(z_t, eps_hat, gamma_t)
        alpha_s, sigma_s = diffusion.alpha_sigma(gamma_s)
        return alpha_s * x_hat + sigma_s * eps_hat

    z_0 = _loop(body, num_steps, progress, z_1)
    return _finish(model, params, z_0, key_decode, decode, return_latent)


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
    progress: bool = False,
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
    shape, z_1, key_steps, key_decode = _begin(key, shape, num_steps, decode)
    gamma_0, gamma_1 = _endpoints(model, params)
    gammas = jnp.linspace(gamma_1, gamma_0, num_steps + 1)  # noisiest first, equal in lambda

    def body(i, carry):
        z_s, x_prev, h_prev = carry
        gamma_s, gamma_t = gammas[i], gammas[i + 1]
        x_hat = diffusion.predict_x(z_s, _eps_hat(model, params, z_s, gamma_s, labels), gamma_s)
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
    return _finish(model, params, z_0, key_decode, decode, return_latent)


# ----------------------------------------------------------------------------------------------
# The probability-flow ODE


def _flow_terms(model: nn.Module, params, t: Array) -> tuple[Array, Array, Array]:
    """(gamma_t, coef = 1/2 gamma'(t) sigma_t, sigma_t), float32 scalars for a scalar t."""
    gamma_t, dgamma_dt = schedules.gamma_and_derivative(lambda u: _gamma(model, params, u), t)
    sigma_t = jnp.sqrt(jax.nn.sigmoid(gamma_t))
    return gamma_t, 0.5 * dgamma_dt * sigma_t, sigma_t


def probability_flow_drift(
    model: nn.Module, params, z: Array, t: Array, labels: Array | None = None
) -> Array:
    """The right-hand side of the probability-flow ODE, dz/dt = 1/2 gamma'(t) sigma_t (eps_hat -
    sigma_t z).

    Not jitted by itself (it is the building block of the ODE solvers); jit it, or call it
    inside a jitted function.

    Args:
      model, params: as in :func:`ancestral_sample`.
      z: latents z_t, float32 ``[B, H, W, C]``.
      t: time in [0, 1], a float32 scalar (the same for the whole batch).
      labels: int ``[B]`` or None.

    Returns:
      dz/dt, float32 ``z.shape`` (latent units per unit of t).
    """
    t = jnp.asarray(t, jnp.float32)
    gamma_t, coef, sigma_t = _flow_terms(model, params, t)
    eps_hat = _eps_hat(model, params, z, gamma_t, labels)
    return coef * (eps_hat - sigma_t * z)


def _solve_per_example(vector_field, y0, args, *, t0, t1, rtol, atol, max_steps, solver):
    """diffeqsolve of one example's state ``y0`` (a pytree); returns (y(t1), NFE int32 scalar)."""
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        _SOLVERS[solver](),
        t0=t0,
        t1=t1,
        dt0=_INITIAL_DT * (t1 - t0),
        y0=y0,
        args=args,
        stepsize_controller=controller,
        max_steps=max_steps,
    )
    y1 = jax.tree_util.tree_map(lambda y: y[-1], sol.ys)
    nfe = 1 + _NFE_PER_STEP * jnp.asarray(sol.stats["num_steps"], jnp.int32)
    return y1, nfe


def _check_ode_settings(rtol, atol, max_steps, solver) -> None:
    _check_positive("rtol", rtol)
    _check_positive("atol", atol)
    _check_positive("max_steps", max_steps)
    _check_choice("solver", solver, _SOLVERS)


def _one(labels_i: Array | None) -> Array | None:
    """One example's labels as a batch of one."""
    return None if labels_i is None else labels_i[None]


@functools.partial(
    jax.jit, static_argnames=("model", "t0", "t1", "rtol", "atol", "max_steps", "solver")
)
def solve_probability_flow(
    model: nn.Module,
    params,
    z: Array,
    *,
    t0: float = 1.0,
    t1: float = 0.0,
    labels: Array | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    solver: str = "tsit5",
) -> tuple[Array, Array]:
    """Integrate the probability-flow ODE from t0 to t1, each example separately.

    t0=1, t1=0 maps prior latents z_1 to z_0 (sampling); t0=0, t1=1 maps z_0 to its latent
    code z_1 (encoding). Adaptive steps with diffrax (PID controller, error norm RMS over one
    example's dimensions). Raises a runtime error if an example needs more than ``max_steps``
    steps.

    Args:
      model, params: as in :func:`ancestral_sample`.
      z: latents at t0, float32 ``[B, H, W, C]``.
      t0, t1: start and end times in [0, 1], floats; static.
      labels: int ``[B]`` or None.
      rtol, atol: relative and absolute tolerances of the step-size controller; static.
      max_steps: the most steps per example; static.
      solver: ``"tsit5"`` or ``"dopri5"``; static.

    Returns:
      ``(z_t1, nfe)``: z at t1, float32 ``z.shape``; and the number of function (network)
      evaluations per example, int32 ``[B]``.
    """
    _check_ode_settings(rtol, atol, max_steps, solver)
    if t0 == t1 or not (0.0 <= t0 <= 1.0 and 0.0 <= t1 <= 1.0):
        raise UserError(f"t0 and t1 must be distinct times in [0, 1], got t0={t0}, t1={t1}")

    def one(z_i, labels_i):
        def vector_field(t, y, args):
            del args
            return probability_flow_drift(model, params, y[None], t, _one(labels_i))[0]

        return _solve_per_example(
            vector_field,
            z_i,
            None,
            t0=t0,
            t1=t1,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            solver=solver,
        )

    return jax.vmap(one)(jnp.asarray(z, jnp.float32), labels)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "shape",
        "decode",
        "return_latent",
        "rtol",
        "atol",
        "max_steps",
        "solver",
    ),
)
def ode_sample(
    model: nn.Module,
    params,
    key: Array,
    *,
    shape: tuple[int, int, int, int],
    labels: Array | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    decode: str = "argmax",
    return_latent: bool = False,
    max_steps: int = 4096,
    solver: str = "tsit5",
) -> Array | tuple[Array, Array]:
    """Sample by integrating the probability-flow ODE from z_1 ~ N(0, I) at t=1 to t=0.

    See :func:`solve_probability_flow` for the solver; z_0 is decoded as in
    :func:`ancestral_sample`. Use :func:`solve_probability_flow` directly to get the NFE.

    Args:
      model, params, key, shape, labels, decode, return_latent: as in :func:`ancestral_sample`.
      rtol, atol, max_steps, solver: as in :func:`solve_probability_flow`; static.

    Returns:
      images, int32 ``shape`` in 0..V-1; with ``return_latent``, ``(images, z_0)``.
    """
    shape, z_1, _, key_decode = _begin(key, shape, None, decode)
    z_0, _ = solve_probability_flow(
        model,
        params,
        z_1,
        t0=1.0,
        t1=0.0,
        labels=labels,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        solver=solver,
    )
    return _finish(model, params, z_0, key_decode, decode, return_latent)


@functools.partial(
    jax.jit,
    static_argnames=("model", "rtol", "atol", "hutchinson", "num_probes", "max_steps", "solver"),
)
def ode_log_prob_latent(
    model: nn.Module,
    params,
    z_0: Array,
    key: Array,
    *,
    labels: Array | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    hutchinson: str = "rademacher",
    num_probes: int = 1,
    max_steps: int = 4096,
    solver: str = "tsit5",
) -> tuple[Array, Array]:
    """log p(z_0) of the continuous-time model: the density the probability-flow ODE gives z_0.

    Integrates z and the divergence of the drift together from t=0 to t=1 and returns
    log p(z_0) = log N(z_1; 0, I) + int_0^1 div(dz/dt)(z_t, t) dt (instantaneous change of
    variables). The divergence is 1/2 gamma'(t) sigma_t tr(J - sigma_t I) with J = d eps_hat/dz;
    the trace is the Hutchinson estimate mean_k v_k^T (J - sigma_t I) v_k (one forward-mode
    Jacobian-vector product per probe) with ``num_probes`` probes per example, drawn once from
    ``key`` and held fixed along the path. The estimate of log p(z_0) is unbiased (up to the
    solver's error). Rademacher probes have the smaller variance (2 sum_{i != j} A_ij^2 against
    2 ||A||_F^2 for Gaussian ones, A = J - sigma_t I) and are exact when J is diagonal.

    Args:
      model, params: as in :func:`ancestral_sample`.
      z_0: latents at t=0, float32 ``[B, H, W, C]``.
      key: PRNG key of the probes.
      labels: int ``[B]`` or None.
      rtol, atol, max_steps, solver: as in :func:`solve_probability_flow`; static.
      hutchinson: probe distribution, ``"rademacher"`` (+-1) or ``"gaussian"``; static.
      num_probes: probes per example (each costs one Jacobian-vector product per function
        evaluation); static.

    Returns:
      ``(log_p, nfe)``: log p(z_0), float32 ``[B]``, nats (a density over the D = H W C
      continuous dimensions of z_0); the number of function evaluations per example, int32
      ``[B]`` (each a network evaluation plus its linearisation).
    """
    _check_ode_settings(rtol, atol, max_steps, solver)
    _check_choice("hutchinson", hutchinson, _HUTCHINSON)
    _check_positive("num_probes", num_probes)
    z_0 = jnp.asarray(z_0, jnp.float32)
    probe_shape = (z_0.shape[0], num_probes, *z_0.shape[1:])
    if hutchinson == "rademacher":
        probes = jax.random.rademacher(key, probe_shape, jnp.float32)
    else:
        probes = jax.random.normal(key, probe_shape, jnp.float32)
    num_dims = math.prod(z_0.shape[1:])

    def one(z_i, probes_i, labels_i):
        def vector_field(t, y, args):
            z, _ = y
            gamma_t, coef, sigma_t = _flow_terms(model, params, t)
            eps_fn = lambda u: _eps_hat(model, params, u[None], gamma_t, _one(labels_i))[0]  # noqa: E731
            eps_hat, jvp_fn = jax.linearize(eps_fn, z)
            # v^T (d eps_hat/dz - sigma_t I) v: the Jacobian of the drift over coef. Estimating
            # the whole of it (rather than adding -sigma_t D exactly) keeps the Gaussian-probe
            # variance 2 ||J - sigma_t I||_F^2 small where eps_hat is nearly sigma_t z.
            jac_probes = jax.vmap(jvp_fn)(args) - sigma_t * args
            trace = jnp.mean(jnp.sum(args * jac_probes, axis=tuple(range(1, args.ndim))))
            return coef * (eps_hat - sigma_t * z), coef * trace

        return _solve_per_example(
            vector_field,
            (z_i, jnp.zeros((), jnp.float32)),
            probes_i,
            t0=0.0,
            t1=1.0,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            solver=solver,
        )

    (z_1, integral), nfe = jax.vmap(one)(z_0, probes, labels)
    log_prior = -0.5 * _sum_per_example(jnp.square(z_1)) - 0.5 * num_dims * math.log(2 * math.pi)
    return log_prior + integral, nfe


class ODELikelihood(NamedTuple):
    """The probability-flow likelihood bound of a batch of integer images.

    Attributes:
      bpd: the bound on -log p(x) in bits per dimension, float32 ``[B]``:
        (reconstruction - log_p_latent + log_q_latent) / (D ln 2), D = H W C.
      nfe: function evaluations of the ODE solve per example, int32 ``[B]``.
      reconstruction: -log p(x|z_0) with the model's discrete decoder, float32 ``[B]``, nats.
      log_p_latent: log p(z_0) from the ODE (:func:`ode_log_prob_latent`), float32 ``[B]``,
        nats.
      log_q_latent: log q(z_0|x) of the encoder, float32 ``[B]``, nats.
    """

    bpd: Array
    nfe: Array
    reconstruction: Array
    log_p_latent: Array
    log_q_latent: Array


@functools.partial(
    jax.jit,
    static_argnames=("model", "rtol", "atol", "hutchinson", "num_probes", "max_steps", "solver"),
)
def ode_log_likelihood(
    model: nn.Module,
    params,
    images: Array,
    key: Array,
    *,
    labels: Array | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    hutchinson: str = "rademacher",
    num_probes: int = 1,
    max_steps: int = 4096,
    solver: str = "tsit5",
) -> ODELikelihood:
    """A bound on -log p(x) in bits/dim from the probability-flow ODE and the discrete decoder.

    The model of x is p(x) = int p(x|z_0) p_ODE(z_0) dz_0: the ODE's density of z_0
    (:func:`ode_log_prob_latent`) followed by the model's per-dimension categorical decoder.
    With x encoded by :func:`vdm_jax.maths.diffusion.encode` and ONE sample z_0 = alpha_0 x +
    sigma_0 eps_0 of q(z_0|x) per example, the returned

        bpd = [-log p(x|z_0) - log p_ODE(z_0) + log q(z_0|x)] / (D ln 2)

    is a one-sample, unbiased estimate (Hutchinson's estimate is unbiased too) of the
    variational upper bound E_q(z_0|x)[...] >= -log p(x); average it over a data set. It
    replaces the diffusion and prior terms of the VLB by the exact ODE density of z_0; the
    reconstruction term is the same as the VLB's.

    Args:
      model, params: as in :func:`ancestral_sample`; ``model.vocab_size`` encodes the data.
      images: integers in 0..V-1, ``[B, H, W, C]`` (e.g. uint8).
      key: PRNG key of z_0's noise and of the probes.
      labels: int ``[B]`` or None.
      rtol, atol, hutchinson, num_probes, max_steps, solver: as in
        :func:`ode_log_prob_latent`; static.

    Returns:
      :class:`ODELikelihood` (``bpd`` ``[B]`` bits/dim, ``nfe`` ``[B]``, and the terms in nats).
    """
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.integer):
        raise UserError(
            f"images must be integers [B, H, W, C], got shape {images.shape}, dtype {images.dtype}"
        )
    key_z, key_probes = jax.random.split(key)
    x = diffusion.encode(images, model.vocab_size)
    gamma_0, _ = _endpoints(model, params)
    eps_0 = jax.random.normal(key_z, x.shape, jnp.float32)
    z_0 = diffusion.q_sample(x, gamma_0, eps_0)
    num_dims = math.prod(x.shape[1:])
    # log N(z_0; alpha_0 x, sigma_0^2 I) with log sigma_0 = 1/2 log sigmoid(gamma_0).
    log_q = -0.5 * _sum_per_example(jnp.square(eps_0)) - num_dims * (
        0.5 * jax.nn.log_sigmoid(gamma_0) + 0.5 * math.log(2 * math.pi)
    )
    log_probs = model.apply(params, z_0, method="decode_log_probs")
    picked = jnp.take_along_axis(log_probs, images.astype(jnp.int32)[..., None], axis=-1)
    reconstruction = -_sum_per_example(picked[..., 0])
    log_p, nfe = ode_log_prob_latent(
        model,
        params,
        z_0,
        key_probes,
        labels=labels,
        rtol=rtol,
        atol=atol,
        hutchinson=hutchinson,
        num_probes=num_probes,
        max_steps=max_steps,
        solver=solver,
    )
    bpd = losses.bits_per_dim(reconstruction - log_p + log_q, num_dims)
    return ODELikelihood(bpd, nfe, reconstruction, log_p, log_q)
