"""The probability-flow ODE of a VDM: its drift, solves, sampling and likelihood.

The functions take ``(model, params, ...)`` as :mod:`vdm_jax.models.protocol` describes and
are each one ``jax.jit`` as in :mod:`vdm_jax.models.sampling`.

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

The ODE solvers integrate each example separately, one after the other (``jax.lax.map`` over
the batch, each example a batch of one): each example gets its own adaptive step sizes and
tolerance test, and runs the same program whatever the batch it came in or the number of
devices, so its result is the same to the bit; the number of function evaluations (NFE) is
reported per example. (A vectorised batch, ``jax.vmap``, rounds differently for each batch
size, and an adaptive solve turns such roundings into other steps and results that differ by
about the tolerance.) The step-size controller's error norm takes each leaf of the state on its
own (:func:`ode_log_prob_latent`'s log-density integral is held to the tolerance by itself,
not as one component among D + 1).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.errors import UserError
from vdm_jax.maths import diffusion, losses, schedules
from vdm_jax.models import protocol

Array = jax.Array

__all__ = [
    "ODELikelihood",
    "ode_log_likelihood",
    "ode_log_prob_latent",
    "ode_sample",
    "probability_flow_drift",
    "solve_probability_flow",
]

_HUTCHINSON = ("rademacher", "gaussian")
_SOLVERS = {"tsit5": "Tsit5", "dopri5": "Dopri5"}  # diffrax's classes
# Tsit5 and Dopri5 have 7 stages, the first equal to the last of the previous step (FSAL): one
# evaluation to start, then 6 per step attempted (accepted or rejected).
_NFE_PER_STEP = 6
_INITIAL_DT = 0.01  # First step, as a fraction of |t1 - t0|; the controller adapts it.


def _flow_terms(model: nn.Module, params, t: Array) -> tuple[Array, Array, Array]:
    """(gamma_t, coef = 1/2 gamma'(t) sigma_t, sigma_t), float32 scalars for a scalar t."""
    gamma_t, dgamma_dt = schedules.gamma_and_derivative(
        lambda u: protocol.gamma(model, params, u), t
    )
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
      model, params: as in :func:`~vdm_jax.models.sampling.ancestral_sample`.
      z: latents z_t, float32 ``[B, H, W, C]``.
      t: time in [0, 1], a float32 scalar (the same for the whole batch).
      labels: int ``[B]`` or None.

    Returns:
      dz/dt, float32 ``z.shape`` (latent units per unit of t).
    """
    t = jnp.asarray(t, jnp.float32)
    gamma_t, coef, sigma_t = _flow_terms(model, params, t)
    eps_hat = protocol.eps_hat(model, params, z, gamma_t, labels)
    return coef * (eps_hat - sigma_t * z)


def _error_norm(scaled_error) -> Array:
    """The step-size controller's norm of the scaled error: the largest, over the state's
    leaves, of the RMS over one leaf.

    diffrax's default, the RMS over every component together, gives the log-density integral
    of :func:`ode_log_prob_latent` (one component beside the D of z) a weight of 1/(D + 1):
    its error went almost unchecked, about 12 nats per solve on an 8x8 image at rtol = atol =
    1e-5, and with it the value depended on which steps rounding led the solver to take. With
    a norm per leaf the integral meets the tolerance by itself. For the latent alone (the
    sampling solve) this is the plain RMS.
    """
    leaves = jax.tree_util.tree_leaves(scaled_error)
    return jnp.max(jnp.stack([jnp.sqrt(jnp.mean(jnp.square(leaf))) for leaf in leaves]))


def _per_example(fn, *xs):
    """``fn`` over the examples of ``xs`` (pytrees with a leading batch axis; None allowed),
    one after the other (``jax.lax.map``), not vectorised.

    Every example runs the same program, with a batch of one, whatever the batch it came in
    and however many devices share that batch: its adaptive steps, and so its result, are the
    same to the bit. A vectorised batch (``jax.vmap``) rounds differently for each batch size,
    and an adaptive solve turns those roundings into other steps taken and results that
    differ by about the tolerance. Sequential solves also stop each at its own number of
    steps, where a vectorised batch runs in lock-step to its slowest example.
    """
    return jax.lax.map(lambda args: fn(*args), xs)


def _solve_per_example(vector_field, y0, args, *, t0, t1, rtol, atol, max_steps, solver):
    """diffeqsolve of one example's state ``y0`` (a pytree); returns (y(t1), NFE int32 scalar)."""
    import diffrax  # imported when first needed: half a second at every start otherwise

    controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=_error_norm)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        getattr(diffrax, _SOLVERS[solver])(),
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
    protocol.check_positive("rtol", rtol)
    protocol.check_positive("atol", atol)
    protocol.check_positive("max_steps", max_steps)
    protocol.check_choice("solver", solver, _SOLVERS)


def _one(labels_i: Array | None) -> Array | None:
    """One example's labels as a batch of one."""
    return None if labels_i is None else labels_i[None]


def _example_flow(model: nn.Module, params, labels_i, latent_i):
    """One example's ``(terms, eps)``: ``terms(t)`` -> (gamma_t, coef = 1/2 gamma'(t) sigma_t,
    sigma_t) and ``eps(z, gamma_t)`` -> eps_hat for z of the image's shape.

    With ``latent_i`` None the model is a VDM (scalars per example); with a latent c ``[D]`` it
    is a :class:`~vdm_jax.models.mulan.MuLAN` whose gamma(t, c), coef and sigma_t are per pixel,
    of the image's shape, and the drift below is elementwise.
    """
    if latent_i is None:

        def eps_vdm(z, g):
            return protocol.eps_hat(model, params, z[None], g, _one(labels_i))[0]

        return functools.partial(_flow_terms, model, params), eps_vdm
    c = latent_i[None]

    def terms(t):
        g, rate = model.apply(params, t[None], c, method=model.gamma_and_derivative)
        sigma = jnp.sqrt(jax.nn.sigmoid(g[0]))
        return g[0], 0.5 * rate[0] * sigma, sigma

    def eps(z, g):
        return model.apply(params, z[None], g[None], c, method=model.predict_noise)[0]

    return terms, eps


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
    example's dimensions), the examples one after the other. Raises a runtime error if an
    example needs more than ``max_steps`` steps.

    Args:
      model, params: as in :func:`~vdm_jax.models.sampling.ancestral_sample`.
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

    return _per_example(one, jnp.asarray(z, jnp.float32), labels)


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
    :func:`~vdm_jax.models.sampling.ancestral_sample`. Use :func:`solve_probability_flow`
    directly to get the NFE.

    Args:
      model, params, key, shape, labels, decode, return_latent: as in
        :func:`~vdm_jax.models.sampling.ancestral_sample`.
      rtol, atol, max_steps, solver: as in :func:`solve_probability_flow`; static.

    Returns:
      images, int32 ``shape`` in 0..V-1; with ``return_latent``, ``(images, z_0)``.
    """
    shape, z_1, _, key_decode = protocol.begin(key, shape, None, decode)
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
    return protocol.finish(model, params, z_0, key_decode, decode, return_latent)


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
    latents: Array | None = None,
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
    ``key`` and held fixed along the path: P probes divide the trace noise's variance by P.
    The estimate of log p(z_0) is unbiased (up to the solver's error, which the step-size
    control holds to the tolerance for the log-density integral by itself). Rademacher
    probes have the smaller variance (2 sum_{i != j} A_ij^2 against 2 ||A||_F^2 for Gaussian
    ones, A = J - sigma_t I) and are exact when J is diagonal.

    Args:
      model, params: as in :func:`~vdm_jax.models.sampling.ancestral_sample`.
      z_0: latents at t=0, float32 ``[B, H, W, C]``.
      key: PRNG key of the probes.
      labels: int ``[B]`` or None.
      latents: for a :class:`~vdm_jax.models.mulan.MuLAN` model, its latent c ``[B, D]``
        (then log p(z_0 | c), with the per-pixel schedule gamma(t, c): the drift and its
        Jacobian's diagonal scale per pixel); None for a VDM.
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
    protocol.check_choice("hutchinson", hutchinson, _HUTCHINSON)
    protocol.check_positive("num_probes", num_probes)
    z_0 = jnp.asarray(z_0, jnp.float32)
    probe_shape = (z_0.shape[0], num_probes, *z_0.shape[1:])
    if hutchinson == "rademacher":
        probes = jax.random.rademacher(key, probe_shape, jnp.float32)
    else:
        probes = jax.random.normal(key, probe_shape, jnp.float32)
    num_dims = math.prod(z_0.shape[1:])

    def one(z_i, probes_i, labels_i, latent_i):
        terms, eps = _example_flow(model, params, labels_i, latent_i)

        def vector_field(t, y, args):
            z, _ = y
            gamma_t, coef, sigma_t = terms(t)
            eps_hat, jvp_fn = jax.linearize(lambda u: eps(u, gamma_t), z)
            # v^T coef (d eps_hat/dz - sigma_t I) v: the drift's Jacobian (coef and sigma_t are
            # per pixel for MuLAN). Estimating the whole of it (rather than adding -sigma_t D
            # exactly) keeps the Gaussian-probe variance small where eps_hat is nearly sigma_t z.
            jac_probes = coef * (jax.vmap(jvp_fn)(args) - sigma_t * args)
            trace = jnp.mean(jnp.sum(args * jac_probes, axis=tuple(range(1, args.ndim))))
            return coef * (eps_hat - sigma_t * z), trace

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

    (z_1, integral), nfe = _per_example(one, z_0, probes, labels, latents)
    log_prior = -0.5 * protocol.sum_per_example(jnp.square(z_1)) - 0.5 * num_dims * math.log(
        2 * math.pi
    )
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
    latents: Array | None = None,
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
      model, params: as in :func:`~vdm_jax.models.sampling.ancestral_sample`;
        ``model.vocab_size`` encodes the data.
      images: integers in 0..V-1, ``[B, H, W, C]`` (e.g. uint8).
      key: PRNG key of z_0's noise and of the probes.
      labels: int ``[B]`` or None.
      latents: a MuLAN model's latent c ``[B, D]`` (then every term is given c: p(x|z_0, c),
        p_ODE(z_0|c), q(z_0|x) at MuLAN's gamma(0), the same for every pixel and c); None
        for a VDM.
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
    gamma_0, _ = protocol.endpoints(model, params)
    eps_0 = jax.random.normal(key_z, x.shape, jnp.float32)
    z_0 = diffusion.q_sample(x, gamma_0, eps_0)
    num_dims = math.prod(x.shape[1:])
    # log N(z_0; alpha_0 x, sigma_0^2 I) with log sigma_0 = 1/2 log sigmoid(gamma_0).
    log_q = -0.5 * protocol.sum_per_example(jnp.square(eps_0)) - num_dims * (
        0.5 * jax.nn.log_sigmoid(gamma_0) + 0.5 * math.log(2 * math.pi)
    )
    if latents is None:
        log_probs = protocol.decode_log_probs(model, params, z_0)
    else:
        log_probs = cast(Array, model.apply(params, z_0, latents, method=model.decode_log_probs))
    picked = jnp.take_along_axis(log_probs, images.astype(jnp.int32)[..., None], axis=-1)
    reconstruction = -protocol.sum_per_example(picked[..., 0])
    log_p, nfe = ode_log_prob_latent(
        model,
        params,
        z_0,
        key_probes,
        labels=labels,
        latents=latents,
        rtol=rtol,
        atol=atol,
        hutchinson=hutchinson,
        num_probes=num_probes,
        max_steps=max_steps,
        solver=solver,
    )
    bpd = losses.bits_per_dim(reconstruction - log_p + log_q, num_dims)
    return ODELikelihood(bpd, nfe, reconstruction, log_p, log_q)
