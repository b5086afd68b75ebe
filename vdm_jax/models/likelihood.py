"""Likelihood estimators a paper reports, per example, batch by batch.

Every estimator is a pure function ``f(model, variables, batch, key, *, indices, ...)`` that
returns an :class:`Estimate`: one value per example of an upper bound on -log p(x) (in nats and
in bits/dim), the K values it averaged, the number of network evaluations it spent, and its
terms. Averages and standard errors over a data set come from :class:`Accumulator`, with the
same masking of padded examples as :mod:`vdm_jax.models.evaluation`.

The estimators (look them up by name with :func:`get_estimator`; :data:`ESTIMATORS` lists them):

``vlb``
    The continuous-time VLB (Kingma et al. 2021, the L_inf bound): prior + reconstruction + the
    diffusion loss at one uniform t per image. 1 network evaluation per image.
``dense_vlb``
    The same bound with the diffusion loss averaged over K stratified noise levels per image,
    t_k = (k + u) / K for k = 0..K-1 and one u ~ U(0, 1) per image (and K draws of z_0 for
    the reconstruction term), as in MuLAN's supplement 15.1 (Sahoo et al. 2024). The same
    expectation as ``vlb`` with a smaller variance per image. K network evaluations.
``discrete``
    The discrete-time bound at T steps (Kingma et al. 2021, the L_T bound) of the model's schedule
    and denoiser, e.g. T = 1000 for a model trained in continuous time, K stratified steps
    per image. K network evaluations.
``ode``
    The probability-flow ODE bound with dequantization averaged over K draws of z_0 (and of
    the Hutchinson probes) per image (:func:`ode`). Adaptive cost: the solver's function
    evaluations, summed over the K draws.
``ode_iw``
    The importance-weighted bound -log (1/K) sum_k exp(-b_k) over the same K per-draw bounds
    (:func:`ode_iw`), which tightens towards -log p(x) as K grows. The same cost as ``ode``.

Each takes a :class:`~vdm_jax.models.mulan.MuLAN` too (the VLB estimators add its latent's
KL term once per image; the ODE ones draw c ~ q(c|x) per draw); ``discrete`` does not.

Why the results do not depend on how a data set is cut into batches, nor on the number of
devices: example i draws everything it uses (noise levels, noise, z_0, probes) from
``fold_in(key, indices[i])``, its global index in the data set, and every example is
evaluated on its own (``jax.vmap``); the ODE solves, one per draw, run one after the other
(``jax.lax.map``), each a batch of one with its own adaptive steps. Give each example its
index in the data set (padded examples any index). Batches of one size give the same values
to the bit; in a batch of another size (or on other devices) the VLB estimators' arithmetic
may round differently (XLA vectorises by size), the ODE solves take the same steps to the
bit, and only their decoder and log q terms may round differently.

Costs are counted in network evaluations (forward passes of the score network); an ODE
function evaluation (also a linearisation and ``num_probes`` Jacobian-vector products) counts
once. The VLB estimators pass B K images through the network at once; the ODE ones run B K
solves one after the other (memory of one solve, time the sum of theirs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.errors import UserError
from vdm_jax.models.evaluation import MaskedMeans, bound_terms
from vdm_jax.models.mulan import MuLAN
from vdm_jax.models.ode import ode_log_likelihood

Array = jax.Array

__all__ = [
    "ESTIMATORS",
    "Accumulator",
    "Estimate",
    "Estimator",
    "LikelihoodResult",
    "dense_vlb",
    "discrete",
    "estimate",
    "example_keys",
    "get_estimator",
    "ode",
    "ode_iw",
    "vlb",
]

_ODE_STATIC = ("rtol", "atol", "hutchinson", "num_probes", "max_steps", "solver")


class Estimate(NamedTuple):
    """One estimator's values for a batch, per example.

    Attributes:
      nats: the estimate of the bound on -log p(x), float32 ``[B]``, nats.
      bpd: the same in bits per dimension, float32 ``[B]``: nats / (H W C ln 2).
      draws: the K per-draw (per-noise-level) bounds it combines, float32 ``[B, K]``, nats;
        ``nats`` is their mean, or for ``ode_iw`` -logsumexp(-draws) + log K.
      spread: the sample standard deviation (ddof = 1) of an image's K draws, float32 ``[B]``,
        bits/dim; NaN when K = 1.
      nfe: network evaluations spent on each example, int32 ``[B]``.
      terms: the bound's terms averaged over the K draws (plain averages for ``ode_iw``), each
        float32 ``[B]``, nats: 'prior', 'reconstruction', 'diffusion' (VLB estimators) or
        'reconstruction', 'log_p_latent', 'log_q_latent' (ODE ones); MuLAN's 'latent' too.
    """

    nats: Array
    bpd: Array
    draws: Array
    spread: Array
    nfe: Array
    terms: dict[str, Array]


# ----------------------------------------------------------------------------------------------
# Checks (user errors, one line each)


def _check_num_draws(name: str, num_draws) -> None:
    if not isinstance(num_draws, (int, np.integer)) or isinstance(num_draws, bool) or num_draws < 1:
        raise UserError(
            f"the {name!r} estimator needs K >= 1 draws per image (an integer), got K={num_draws!r}"
        )


def _check_continuous(name: str, model) -> None:
    steps = getattr(model, "num_steps", 0)
    if steps:
        raise UserError(
            f"the {name!r} estimator needs a continuous-time model, but this one is "
            f"discrete-time (num_steps={steps}); use 'discrete' (its bound at T={steps})"
        )


def _check_batch(batch: Mapping[str, Any], indices) -> Array:
    """The batch's example indices, int32 ``[B]`` (0..B-1 when ``indices`` is None)."""
    images = batch["image"]
    if jnp.ndim(images) != 4 or not jnp.issubdtype(jnp.result_type(images), jnp.integer):
        raise UserError(
            f"batch['image'] must be integers [B, H, W, C], got shape {jnp.shape(images)}, "
            f"dtype {jnp.result_type(images)}"
        )
    size = jnp.shape(images)[0]
    if indices is None:
        return jnp.arange(size, dtype=jnp.int32)
    if jnp.shape(indices) != (size,):
        raise UserError(
            f"indices must have one entry per example, shape ({size},), got {jnp.shape(indices)}"
        )
    return jnp.asarray(indices, jnp.int32)


def example_keys(key: Array, indices: Array) -> Array:
    """One PRNG key per example: ``fold_in(key, indices[i])``, ``[B]`` keys.

    What makes every estimator's value for an example a function of (key, its index, the
    example) alone, whatever the batch it came in or the device it ran on.
    """
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.int32))


def _combine(draws: Array, num_dims: int, nfe: Array, terms, *, importance_weighted=False):
    num_draws = draws.shape[1]
    if importance_weighted:
        # -log mean_k exp(-b_k), stably: b_k of images are thousands of nats.
        nats = math.log(num_draws) - jax.scipy.special.logsumexp(-draws, axis=1)
    else:
        nats = jnp.mean(draws, axis=1)
    to_bpd = 1.0 / (num_dims * math.log(2.0))
    if num_draws > 1:
        spread = jnp.std(draws, axis=1, ddof=1) * to_bpd
    else:
        spread = jnp.full(draws.shape[:1], jnp.nan, jnp.float32)
    terms = {k: jnp.mean(v, axis=1) for k, v in terms.items()}
    return Estimate(nats, nats * to_bpd, draws, spread, nfe.astype(jnp.int32), terms)


# ----------------------------------------------------------------------------------------------
# The variational bounds


def _bound_draws(model, variables, batch, key, indices, num_draws, num_steps) -> Estimate:
    """The bound at ``num_draws`` stratified noise levels per example (T = ``num_steps``)."""
    indices = _check_batch(batch, indices)
    # The VDM's antithetic times, (u + j/K) mod 1 over a batch of K, are one stratified draw
    # t_k = (k + u')/K (in another order): the K copies of an image get one level per stratum.
    model = model.clone(antithetic_time_sampling=True)
    fields = {k: batch[k] for k in ("image", "label", "conditioning") if batch.get(k) is not None}

    def one(example, key_i):
        copies = jax.tree_util.tree_map(
            lambda v: jnp.broadcast_to(v[None], (num_draws, *jnp.shape(v))), example
        )
        return bound_terms(model, variables, copies, key_i, num_steps=num_steps)

    terms = jax.vmap(one)(fields, example_keys(key, indices))  # each [B, K]
    named = {"prior": terms.prior, "reconstruction": terms.reconstruction,
             "diffusion": terms.diffusion}  # fmt: skip
    if hasattr(terms, "latent"):
        # MuLAN: each of the K draws has its own c ~ q(c|x), but the latent's KL term is a
        # function of x alone, so the mean over K adds it once per image.
        named["latent"] = terms.latent
    draws = sum(named.values())
    size = draws.shape[0]
    num_dims = math.prod(jnp.shape(batch["image"])[1:])
    return _combine(draws, num_dims, jnp.full((size,), num_draws), named)


@functools.partial(jax.jit, static_argnames=("model",))
def vlb(model, variables, batch: Mapping[str, Array], key: Array, *, indices=None) -> Estimate:
    """The continuous-time VLB, one noise level t ~ U(0, 1) and one z_0 per image.

    Kingma et al. 2021 (T -> infinity): KL(q(z_1|x) || p(z_1)) + E[-log p(x|z_0)] +
    1/2 E_t[gamma'(t) ||eps - eps_hat(z_t, t)||^2], each expectation estimated with one draw.
    The same estimator as :func:`vdm_jax.models.evaluation.evaluate_bpd`, with draws per
    example instead of per batch (antithetic times over a batch tie examples together).

    Args:
      model: a :class:`~vdm_jax.models.vdm.VDM` in continuous time (``num_steps=0``); static.
      variables: its variables, e.g. ``{'params': ema_params}``.
      batch: 'image' integer ``[B, H, W, C]`` in 0..V-1; optionally 'label' int ``[B]`` (passed
        to the model when present) and 'conditioning' float ``[B]`` (see
        :func:`~vdm_jax.models.evaluation.bound_terms`).
      key: PRNG key of the evaluation; example i uses ``fold_in(key, indices[i])``.
      indices: int ``[B]``, each example's global index in the data set (default 0..B-1).

    Returns:
      :class:`Estimate` with K = 1 (``spread`` NaN), ``nfe`` 1.

    Raises:
      UserError: a discrete-time model, or a batch that is not integer ``[B, H, W, C]``.
    """
    _check_continuous("vlb", model)
    return _bound_draws(model, variables, batch, key, indices, 1, 0)


@functools.partial(jax.jit, static_argnames=("model", "num_draws"))
def dense_vlb(
    model, variables, batch: Mapping[str, Array], key: Array, *, num_draws: int, indices=None
) -> Estimate:
    """The continuous-time VLB averaged over K stratified noise levels per image.

    The diffusion term is averaged over t_k = (k + u) / K, k = 0..K-1, with one u ~ U(0, 1)
    per image, and the reconstruction term over K draws of z_0 (MuLAN, Sahoo et al. 2024,
    supplement 15.1). Unbiased for the same bound as :func:`vlb`; stratification makes its
    variance per image at most that of K independent levels.

    Args:
      model, variables, batch, key, indices: as in :func:`vlb`.
      num_draws: K >= 1, noise levels per image; static.

    Returns:
      :class:`Estimate`: ``draws`` ``[B, K]`` the bound at each level, ``spread`` their
      standard deviation in bits/dim, ``nfe`` K.

    Raises:
      UserError: K < 1, a discrete-time model, or a bad batch.
    """
    _check_num_draws("dense_vlb", num_draws)
    _check_continuous("dense_vlb", model)
    return _bound_draws(model, variables, batch, key, indices, num_draws, 0)


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "num_draws"))
def discrete(
    model,
    variables,
    batch: Mapping[str, Array],
    key: Array,
    *,
    num_steps: int | None = None,
    num_draws: int = 1,
    indices=None,
) -> Estimate:
    """The discrete-time bound at T steps, K stratified steps per image.

    Kingma et al. 2021 with the discrete-time diffusion loss L_T = T/2 E_i[expm1(gamma_t - gamma_s)
    ||eps - eps_hat||^2], t = i/T, s = (i - 1)/T: the bound of the discrete-time model that the
    schedule and the denoiser define at T steps, whether the model was trained in continuous
    time (it approaches the continuous VLB from above as T grows) or at its own T. The steps
    of an image are i_k = ceil(T t_k) for the stratified t_k of :func:`dense_vlb`.

    Args:
      model, variables, batch, key, indices: as in :func:`vlb`; the model may be
        discrete-time.
      num_steps: T >= 1; None takes the model's own ``num_steps`` (an error when that is 0);
        static.
      num_draws: K >= 1, steps drawn per image; static.

    Returns:
      :class:`Estimate`, ``nfe`` K.

    Raises:
      UserError: K < 1, T < 1, or no T for a continuous-time model; a bad batch.
    """
    _check_num_draws("discrete", num_draws)
    if num_steps is None:
        num_steps = getattr(model, "num_steps", 0)
        if not num_steps:
            raise UserError(
                "the 'discrete' estimator needs T: give num_steps (e.g. 1000) for a "
                "continuous-time model"
            )
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise UserError(f"the 'discrete' estimator needs T >= 1 steps, got T={num_steps!r}")
    return _bound_draws(model, variables, batch, key, indices, num_draws, num_steps)


# ----------------------------------------------------------------------------------------------
# The probability-flow ODE


def _ode_draws(name, model, params, batch, key, indices, num_draws, settings) -> Estimate:
    _check_num_draws(name, num_draws)
    _check_continuous(name, model)
    is_mulan = isinstance(model, MuLAN)
    if is_mulan and name == "ode_iw" and model.latent_kind == "topk":
        raise UserError(
            "the 'ode_iw' estimator weighs each draw of the latent c by p(c) / q(c|x), which a "
            "MuLAN topk latent (a relaxed k-hot) does not have; use 'ode' (with the authors' KL "
            "term) or a gaussian latent"
        )
    indices = _check_batch(batch, indices)
    images = jnp.asarray(batch["image"])
    size = images.shape[0]
    keys = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(
        jnp.arange(num_draws)))(example_keys(key, indices))  # fmt: skip
    # Draw k of example i is a batch of one, solved after the others (lax.map, not vmap): the
    # same program whatever the batch or the devices, so its steps and value are the same to
    # the bit (see vdm_jax.models.ode).
    flat_images = jnp.repeat(images, num_draws, axis=0)[:, None]
    flat_keys = keys.reshape(size * num_draws, *keys.shape[2:])
    labels = batch.get("label")
    flat_labels = None if labels is None else jnp.repeat(jnp.asarray(labels), num_draws)[:, None]

    def one(args):
        x, k, y = args
        if not is_mulan:
            return ode_log_likelihood(model, params, x, k, labels=y, **settings), None
        # gaussian: log q(c|x) - log p(c) of the draw (unbiased for the KL; importance
        # weights need it); topk: the authors' KL term (no density to weigh a draw by).
        key_c, k = jax.random.split(k)
        method = (
            model.draw_latent if model.latent_kind == "topk" else model.draw_latent_with_log_ratio
        )
        c, latent = model.apply(params, x, key_c, method=method)
        return ode_log_likelihood(model, params, x, k, latents=c, **settings), latent

    out, latent = jax.lax.map(one, (flat_images, flat_keys, flat_labels))
    per_draw = lambda v: v.reshape(size, num_draws)  # noqa: E731
    reconstruction, log_p, log_q = map(
        per_draw, (out.reconstruction, out.log_p_latent, out.log_q_latent)
    )
    draws = reconstruction - log_p + log_q
    terms = {"reconstruction": reconstruction, "log_p_latent": log_p, "log_q_latent": log_q}
    if is_mulan:
        terms["latent"] = per_draw(latent)
        draws = draws + terms["latent"]
    nfe = jnp.sum(per_draw(out.nfe), axis=1)
    num_dims = math.prod(images.shape[1:])
    return _combine(draws, num_dims, nfe, terms, importance_weighted=name == "ode_iw")


@functools.partial(jax.jit, static_argnames=("model", "num_draws", *_ODE_STATIC))
def ode(
    model,
    params,
    batch: Mapping[str, Array],
    key: Array,
    *,
    num_draws: int = 1,
    indices=None,
    **solve,
) -> Estimate:
    """The probability-flow ODE bound with dequantization, averaged over K draws of z_0.

    b_k = -log p(x|z_0k) - log p_ODE(z_0k) + log q(z_0k|x) with z_0k ~ q(z_0|x) =
    N(alpha_0 x, sigma_0^2 I) and log p_ODE from the instantaneous change of variables
    (Chen et al. 2018; Song et al. 2021, appendix D.2) with Hutchinson's trace; the estimate
    is mean_k b_k, unbiased for the variational bound E_q[b] >= -log p(x) of the model
    p(x) = int p(x|z_0) p_ODE(z_0) dz_0. K lowers its variance, not its expectation (see
    :func:`ode_iw`). For MuLAN each draw also draws c_k ~ q(c|x) and b_k adds log q(c_k|x) -
    log p(c_k) (gaussian latent; term 'latent'), with every term given c_k (p_ODE(z_0|c) the
    ODE of the per-pixel schedule gamma(t, c)): a bound on -log p(x) of p(x) = int p(c) p(x|c)
    dc. A topk latent adds the authors' KL term instead: their estimate, not a proven bound.

    Args:
      model: a continuous-time VDM-like module (see :mod:`vdm_jax.models.sampling`) or a
        :class:`~vdm_jax.models.mulan.MuLAN`; static.
      params: its variables dict.
      batch: 'image' integer ``[B, H, W, C]`` in 0..V-1; optionally 'label' int ``[B]``.
      key: PRNG key; draw k of example i uses ``fold_in(fold_in(key, indices[i]), k)``, so the
        first K' draws at K > K' are the draws at K'.
      num_draws: K >= 1, draws of z_0 (and probes) per image; static.
      indices: int ``[B]``, each example's global index in the data set (default 0..B-1).
      **solve: the ODE solve's settings ``rtol``, ``atol``, ``hutchinson``, ``num_probes``
        (Hutchinson probes per draw), ``max_steps``, ``solver``, with the meanings and
        defaults of :func:`vdm_jax.models.ode.ode_log_prob_latent`; static.

    Returns:
      :class:`Estimate`: ``draws`` ``[B, K]`` the b_k in nats, ``nfe`` the solver's function
      evaluations summed over the K draws.

    Raises:
      UserError: K < 1, a discrete-time model, or a bad batch.
    """
    return _ode_draws("ode", model, params, batch, key, indices, num_draws, solve)


@functools.partial(jax.jit, static_argnames=("model", "num_draws", *_ODE_STATIC))
def ode_iw(
    model,
    params,
    batch: Mapping[str, Array],
    key: Array,
    *,
    num_draws: int = 1,
    indices=None,
    **solve,
) -> Estimate:
    """The importance-weighted ODE bound -log (1/K) sum_k exp(-b_k) over K draws of z_0.

    With the b_k of :func:`ode`, exp(-b_k) = p(x|z_0k) p_ODE(z_0k) / q(z_0k|x) is an unbiased
    estimate of p(x); by Jensen the bound's expectation is >= -log p(x), does not increase
    with K, and tends to -log p(x) (Burda et al. 2016, theorem 1); the gap is about
    Var_q[w] / (2 K p(x)^2) for large K, w = exp(-b). K = 1 is :func:`ode`. i-DODE (Zheng et
    al. 2023) reports ODE likelihoods with this bound. Computed with logsumexp (the b_k of an
    image are thousands of nats). Hutchinson's estimate of log p_ODE is unbiased but its
    exponential is not: with a noisy trace the bound is slightly optimistic; more probes, or
    a model whose Jacobian is diagonal, remove that.

    Args:
      model, params, batch, key, num_draws, indices, solve: as in :func:`ode` (``solve``: its
        keyword arguments for the solver).

    Returns:
      :class:`Estimate`: ``nats`` the importance-weighted bound, ``draws`` ``[B, K]`` the b_k
      (so the bound at any K' <= K is -logsumexp(-draws[:, :K']) + log K'), ``nfe`` as in
      :func:`ode`.

    Raises:
      UserError: K < 1, a discrete-time model, a bad batch, or a MuLAN topk latent (no
        density q(c|x) to weigh draws of c by).
    """
    return _ode_draws("ode_iw", model, params, batch, key, indices, num_draws, solve)


# ----------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True)
class Estimator:
    """An estimator's entry in :data:`ESTIMATORS`.

    Attributes:
      name: its name, as metrics name it (``test/<name>_bpd``).
      fn: the function, ``fn(model, variables, batch, key, *, indices, ...) -> Estimate``.
      takes_num_draws: whether it takes K (``num_draws``); ``vlb`` is K = 1 only.
      continuous_time: whether it needs a continuous-time model.
      cost: network evaluations per image, in words (for a cost table).
    """

    name: str
    fn: Callable[..., Estimate]
    takes_num_draws: bool
    continuous_time: bool
    cost: str


#: The estimators by name, in the order a cost table lists them.
ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("vlb", vlb, False, True, "1"),
        Estimator("dense_vlb", dense_vlb, True, True, "K"),
        Estimator("discrete", discrete, True, False, "K"),
        Estimator("ode", ode, True, True, "the solver's evaluations, summed over K draws"),
        Estimator("ode_iw", ode_iw, True, True, "the solver's evaluations, summed over K draws"),
    )
}


def get_estimator(name: str) -> Estimator:
    """The :class:`Estimator` called ``name``; a :class:`~vdm_jax.errors.UserError` if none is."""
    if name not in ESTIMATORS:
        raise UserError(f"unknown likelihood estimator {name!r}; known: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def estimate(
    name: str,
    model,
    variables,
    batch: Mapping[str, Array],
    key: Array,
    *,
    num_draws: int = 1,
    indices=None,
    **options,
) -> Estimate:
    """Run the estimator called ``name`` on a batch: one entry point for every estimator; it
    checks the name, K and the model's time before anything compiles.

    Args:
      name: one of :data:`ESTIMATORS` ('vlb', 'dense_vlb', 'discrete', 'ode', 'ode_iw').
      model, variables, batch, key, indices: as in :func:`vlb`.
      num_draws: K >= 1 (``vlb`` takes only 1).
      **options: the estimator's own settings (``num_steps`` of 'discrete'; the ODE solve's
        ``rtol``, ``atol``, ``hutchinson``, ``num_probes``, ``max_steps``, ``solver``).

    Returns:
      :class:`Estimate`.

    Raises:
      UserError: an unknown name, K < 1 (or K > 1 for 'vlb'), a continuous-time estimator
        asked of a discrete-time model.
    """
    entry = get_estimator(name)
    _check_num_draws(name, num_draws)
    if entry.continuous_time:
        _check_continuous(name, model)
    if not entry.takes_num_draws and num_draws != 1:
        raise UserError(
            f"the {name!r} estimator draws one noise level per image, got K={num_draws}; "
            "use 'dense_vlb' for K > 1"
        )
    draws = {"num_draws": num_draws} if entry.takes_num_draws else {}
    return entry.fn(model, variables, batch, key, indices=indices, **draws, **options)


# ----------------------------------------------------------------------------------------------
# Averages over a data set


@dataclasses.dataclass(frozen=True)
class LikelihoodResult:
    """An estimator's figure over a data set.

    Attributes:
      estimator: its name.
      num_draws: K.
      bpd: mean of the per-example estimates, bits/dim.
      bpd_stderr: its standard error, sample std of the per-example estimates / sqrt(n), which
        includes the estimator's own noise (the K draws of each example).
      spread_bpd: mean over examples of the per-image spread across the K draws, bits/dim
        (NaN for K = 1).
      nfe: mean network evaluations per example.
      num_examples: n.
      terms_bpd: the means of the estimate's terms, bits/dim.
    """

    estimator: str
    num_draws: int
    bpd: float
    bpd_stderr: float
    spread_bpd: float
    nfe: float
    num_examples: int
    terms_bpd: dict[str, float]

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics ``{prefix}{estimator}_bpd``, ``..._bpd_stderr``, ``..._spread_bpd``,
        ``..._nfe``, ``..._num_examples`` and ``{prefix}{estimator}_{term}_bpd``."""
        head = f"{prefix}{self.estimator}_"
        fields = ("bpd", "bpd_stderr", "spread_bpd", "nfe", "num_examples")
        out = {head + name: getattr(self, name) for name in fields}
        out.update({f"{head}{k}_bpd": v for k, v in self.terms_bpd.items()})
        return out


class Accumulator:
    """An estimator's per-example values averaged over masked batches (a
    :class:`~vdm_jax.models.evaluation.MaskedMeans` of them); :meth:`result` reads them."""

    def __init__(self, estimator: str, num_draws: int = 1):
        self.estimator, self.num_draws = estimator, num_draws
        self._sums = MaskedMeans()

    def add(self, batch_estimate: Estimate, mask=None) -> None:
        """Add a batch's :class:`Estimate`; ``mask`` bool ``[B]`` marks the real examples
        (None: all)."""
        est = batch_estimate
        columns = {"bpd": est.bpd, "spread": est.spread, "nfe": est.nfe}
        self._sums.add({**columns, **{"term_" + k: v for k, v in est.terms.items()}}, mask)

    def result(self, num_dims: int) -> LikelihoodResult:
        """The averages over everything added; ``num_dims`` (H W C) converts the terms' nats
        to bits/dim."""
        mean = self._sums.means()
        to_bpd = 1.0 / (num_dims * math.log(2.0))
        return LikelihoodResult(
            estimator=self.estimator,
            num_draws=self.num_draws,
            bpd=mean["bpd"],
            bpd_stderr=self._sums.stderr("bpd"),
            spread_bpd=mean["spread"],
            nfe=mean["nfe"],
            num_examples=self._sums.count,
            terms_bpd={k[5:]: v * to_bpd for k, v in mean.items() if k.startswith("term_")},
        )
