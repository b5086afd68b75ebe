"""Tests of vdm_jax.models.likelihood: every estimator against a closed form or a reference.

The models: ``GaussianModel``, data x ~ N(mu, s^2) in every dimension with the exact optimal
denoiser E[eps | z_t], whose probability-flow ODE is the affine map z_t = m_t + sqrt(v_t / v_0)
(z_0 - m_0) (m_t, v_t the mean and variance of q(z_t)), so the density it gives z_0 from the
N(0, I) prior is N(FLOW_MEAN, FLOW_VAR) per dimension, exactly; and ``VDM`` with that denoiser
as its score network, a cheap model to compile for the variational bounds. The discrete data
set of the importance-weighted test is that model's own distribution over V = 8 values, whose
probabilities p(x) = int p(x|z_0) N(z_0; FLOW_MEAN, FLOW_VAR) dz_0 are computed here by
quadrature.
"""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp

from vdm_jax.errors import UserError
from vdm_jax.maths import losses
from vdm_jax.maths.diffusion import expand_gamma
from vdm_jax.maths.schedules import FixedLinearSchedule
from vdm_jax.models import likelihood, ode
from vdm_jax.models.unet import ScoreUNet
from vdm_jax.models.vdm import VDM

MU, S, V = 0.1, 0.5, 8
GAMMA_0, GAMMA_1 = -5.0, 5.0
NO_PARAMS: dict = {}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _moments(gamma: float) -> tuple[float, float]:
    """Mean and variance of q(z_t) for the Gaussian data at gamma_t."""
    alpha2 = _sigmoid(-gamma)
    return math.sqrt(alpha2) * MU, alpha2 * S * S + _sigmoid(gamma)


M0, V0 = _moments(GAMMA_0)
M1, V1 = _moments(GAMMA_1)
FLOW_MEAN, FLOW_VAR = M0 - math.sqrt(V0 / V1) * M1, V0 / V1
ALPHA_0, SIGMA_0 = math.sqrt(_sigmoid(-GAMMA_0)), math.sqrt(_sigmoid(GAMMA_0))
VALUES = (2.0 * np.arange(V) + 1.0) / V - 1.0  # the encoded data values e_v


def _optimal_eps(z, gamma_t):
    g = expand_gamma(gamma_t, z.ndim)
    alpha2, sigma2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
    return jnp.sqrt(sigma2) * (z - jnp.sqrt(alpha2) * MU) / (alpha2 * S**2 + sigma2)


class GaussianModel(nn.Module):
    """A VDM-like module whose data are N(mu, s^2) per dimension, with the optimal denoiser."""

    vocab_size: int = V
    schedule: nn.Module = FixedLinearSchedule(GAMMA_0, GAMMA_1)

    def gamma(self, t):
        return self.schedule(t)

    def endpoints(self):
        return self.schedule.endpoints()

    def predict_noise(self, z, gamma_t, labels=None, *, train=False):
        return _optimal_eps(z, gamma_t)

    def decode_log_probs(self, z_0):
        gamma_0, _ = self.endpoints()
        return losses.decoder_log_probs(z_0, gamma_0, self.vocab_size)


class OptimalEpsNet(nn.Module):
    """The Gaussian model's eps_hat as a score network (the ``ScoreUNet`` signature)."""

    def __call__(self, z, gamma_t, labels=None, *, train=False):
        return _optimal_eps(z, gamma_t)


GAUSS = GaussianModel()
CHEAP_VDM = VDM(OptimalEpsNet(), FixedLinearSchedule(GAMMA_0, GAMMA_1), vocab_size=V)


def _images(key, size, shape=(2, 2, 1)):
    """Integer images drawn from the Gaussian data, rounded to the V bins."""
    x = MU + S * jax.random.normal(key, (size, *shape))
    return jnp.clip(jnp.floor((x + 1.0) * V / 2.0), 0, V - 1).astype(jnp.int32)


def _padded_halves(batch_size, images, cut):
    """The batch cut at ``cut`` into two batches of ``batch_size``, padded as evaluation pads
    a short batch (zeros, any index), with each real example's global index."""
    out = []
    for lo, hi in ((0, cut), (cut, len(images))):
        pad = batch_size - (hi - lo)
        part = jnp.concatenate([images[lo:hi], jnp.zeros((pad, *images.shape[1:]), images.dtype)])
        indices = jnp.concatenate([jnp.arange(lo, hi), jnp.full((pad,), 10_000 + lo)])
        out.append(({"image": part}, indices, hi - lo))
    return out


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_one_clear_user_error():
    batch, key = {"image": jnp.zeros((2, 2, 2, 1), jnp.int32)}, jax.random.key(0)
    with pytest.raises(UserError, match=r"unknown likelihood estimator 'elbo'; known: vlb, "
                       r"dense_vlb, discrete, ode, ode_iw"):  # fmt: skip
        likelihood.estimate("elbo", GAUSS, NO_PARAMS, batch, key)
    for name in ("dense_vlb", "discrete", "ode", "ode_iw"):
        with pytest.raises(UserError, match=rf"the '{name}' estimator needs K >= 1 .*, got K=0"):
            likelihood.estimate(name, CHEAP_VDM, NO_PARAMS, batch, key, num_draws=0)
    with pytest.raises(UserError, match="needs K >= 1"):
        likelihood.dense_vlb(CHEAP_VDM, NO_PARAMS, batch, key, num_draws=-1)
    with pytest.raises(UserError, match=r"'vlb' estimator draws one noise level .* 'dense_vlb'"):
        likelihood.estimate("vlb", CHEAP_VDM, NO_PARAMS, batch, key, num_draws=4)
    discrete_time = CHEAP_VDM.clone(num_steps=10)
    for name in ("vlb", "dense_vlb", "ode", "ode_iw"):
        message = (
            rf"the '{name}' estimator needs a continuous-time model, but this one is "
            r"discrete-time \(num_steps=10\); use 'discrete' \(its bound at T=10\)"
        )
        with pytest.raises(UserError, match=message):
            likelihood.estimate(name, discrete_time, NO_PARAMS, batch, key, num_draws=1)
        with pytest.raises(UserError, match=message):  # the functions themselves too
            k = {} if name == "vlb" else {"num_draws": 2}
            likelihood.get_estimator(name).fn(discrete_time, NO_PARAMS, batch, key, **k)
    with pytest.raises(UserError, match="needs T: give num_steps"):
        likelihood.discrete(CHEAP_VDM, NO_PARAMS, batch, key)
    with pytest.raises(UserError, match="T >= 1 steps, got T=0"):
        likelihood.discrete(CHEAP_VDM, NO_PARAMS, batch, key, num_steps=0)
    with pytest.raises(UserError, match=r"batch\['image'\] must be integers"):
        likelihood.vlb(CHEAP_VDM, NO_PARAMS, {"image": jnp.zeros((2, 2, 2, 1))}, key)
    with pytest.raises(UserError, match=r"indices must have one entry per example, shape \(2,\)"):
        likelihood.vlb(CHEAP_VDM, NO_PARAMS, batch, key, indices=jnp.arange(3))
    for name in ("ode", "ode_iw"):
        with pytest.raises(UserError, match="num_probes must be positive, got 0"):
            likelihood.estimate(name, GAUSS, NO_PARAMS, batch, key, num_probes=0)
    assert likelihood.get_estimator("ode_iw").fn is likelihood.ode_iw


# ------------------------------------------------------------------------------------------------
# The variational bounds


NUM = 512
IMAGES = _images(jax.random.key(0), NUM)
INDICES = jnp.arange(NUM)
KEY = jax.random.key(1)
# One compilation each, shared by the tests below (the same shapes and static arguments).
BOUNDS = {
    "vlb": lambda b, k, i: likelihood.vlb(CHEAP_VDM, NO_PARAMS, b, k, indices=i),
    "dense_vlb": lambda b, k, i: likelihood.dense_vlb(
        CHEAP_VDM, NO_PARAMS, b, k, num_draws=8, indices=i),
    # A discrete-time model: its own T is the default.
    "discrete": lambda b, k, i: likelihood.discrete(
        CHEAP_VDM.clone(num_steps=1000), NO_PARAMS, b, k, num_draws=8, indices=i),
}  # fmt: skip


def test_dense_vlb_has_the_vlbs_mean_and_a_smaller_spread_and_discrete_tends_to_it():
    batch = {"image": IMAGES}
    single, dense, fine = (BOUNDS[n](batch, KEY, INDICES) for n in BOUNDS)
    for e, k in ((single, 1), (dense, 8), (fine, 8)):
        assert e.nats.shape == e.bpd.shape == e.spread.shape == e.nfe.shape == (NUM,)
        assert e.draws.shape == (NUM, k) and e.nfe.dtype == jnp.int32 and np.all(e.nfe == k)
        np.testing.assert_allclose(e.nats, sum(e.terms.values()), rtol=1e-5)
        np.testing.assert_allclose(e.bpd, e.nats / (4 * math.log(2)), rtol=1e-6)
    assert np.all(np.isnan(single.spread)) and np.all(np.asarray(dense.spread) > 0)
    np.testing.assert_allclose(
        dense.spread, np.std(np.asarray(dense.draws), 1, ddof=1) / (4 * math.log(2)), rtol=1e-4
    )
    # The stratified levels: the same mean, and a smaller spread over the images.
    a, b = np.asarray(single.bpd, np.float64), np.asarray(dense.bpd, np.float64)
    se = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / NUM)
    assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)
    assert b.std() < 0.5 * a.std(), (b.std(), a.std())
    print(
        f"\nvlb {a.mean():.4f} (sd over images {a.std():.4f}), dense_vlb K=8 {b.mean():.4f} "
        f"(sd {b.std():.4f}, per-image spread {np.mean(dense.spread):.4f}) bits/dim"
    )

    # The discrete bound of the same denoiser at T = 1000 steps: the VLB's, to its noise.
    f = np.asarray(fine.bpd, np.float64)
    assert abs(f.mean() - b.mean()) < 4 * math.sqrt((f.var() + b.var()) / NUM)


def test_vlb_estimators_do_not_depend_on_the_batch_split_and_accumulate_with_stderr():
    whole = {n: run({"image": IMAGES}, KEY, INDICES) for n, run in BOUNDS.items()}
    accumulators = {n: likelihood.Accumulator(n, 1 if n == "vlb" else 8) for n in BOUNDS}
    for part, indices, n in _padded_halves(NUM, IMAGES, 300):
        lo = int(indices[0])
        for name, run in BOUNDS.items():
            got = run(part, KEY, indices)
            np.testing.assert_array_equal(
                got.draws[:n], whole[name].draws[lo : lo + n], err_msg=name
            )
            accumulators[name].add(got, np.arange(NUM) < n)
    # Another key, other values: the key is used.
    other = BOUNDS["vlb"]({"image": IMAGES}, jax.random.key(4), INDICES)
    assert not np.any(np.asarray(other.nats) == np.asarray(whole["vlb"].nats))

    for name, acc in accumulators.items():
        result, est = acc.result(num_dims=4), whole[name]
        bpd = np.asarray(est.bpd, np.float64)
        assert result.num_examples == NUM and result.nfe == est.nfe[0]
        np.testing.assert_allclose(result.bpd, bpd.mean(), rtol=1e-6)
        np.testing.assert_allclose(result.bpd_stderr, bpd.std(ddof=1) / math.sqrt(NUM), rtol=1e-4)
        np.testing.assert_allclose(result.spread_bpd, np.mean(est.spread), rtol=1e-5)
        np.testing.assert_allclose(sum(result.terms_bpd.values()), result.bpd, rtol=1e-5)
        metrics = result.as_dict("test/")
        assert metrics[f"test/{name}_bpd"] == result.bpd
        assert {f"test/{name}_bpd_stderr", f"test/{name}_prior_bpd"} <= set(metrics)
    with pytest.raises(ValueError, match="empty"):
        likelihood.Accumulator("vlb").result(num_dims=4)


# ------------------------------------------------------------------------------------------------
# The probability-flow ODE


@pytest.mark.slow
def test_ode_bound_of_the_gaussian_model_matches_its_closed_form():
    """log p_ODE(z_0) is exact here (an affine flow; a diagonal Jacobian makes Rademacher probes
    exact), so the draws' terms have closed-form expectations over z_0 ~ q(z_0|x)."""
    num, draws, dims = 8, 16, 4
    images = _images(jax.random.key(7), num)
    key = jax.random.key(8)
    est = likelihood.ode(GAUSS, NO_PARAMS, {"image": images}, key, num_draws=draws,
                         rtol=1e-4, atol=1e-4)  # fmt: skip
    assert est.draws.shape == (num, draws) and est.nfe.shape == (num,) and np.all(est.nfe > draws)
    np.testing.assert_allclose(est.nats, np.mean(est.draws, 1), rtol=1e-6)
    np.testing.assert_allclose(
        est.nats,
        est.terms["reconstruction"] - est.terms["log_p_latent"] + est.terms["log_q_latent"],
        rtol=1e-5,
    )
    # E_q[log q(z_0|x)] = -D/2 (1 + log 2 pi sigma_0^2); E_q[-log N(z_0; m, v)] per dimension
    # = ((alpha_0 x - m)^2 + sigma_0^2) / 2v + log(2 pi v) / 2. Standard errors over the draws.
    x = VALUES[np.asarray(images).reshape(num, dims)]
    expected_q = -0.5 * dims * (1.0 + math.log(2 * math.pi * SIGMA_0**2))
    expected_p = np.sum(
        (np.square(ALPHA_0 * x - FLOW_MEAN) + SIGMA_0**2) / (2 * FLOW_VAR)
        + 0.5 * math.log(2 * math.pi * FLOW_VAR),
        axis=1,
    )
    total = draws * num
    q, p = np.asarray(est.terms["log_q_latent"]), -np.asarray(est.terms["log_p_latent"])
    # sd of log q per draw: sqrt(D / 2); of -log p: sqrt(D) sigma_0 |alpha_0 x - m| / v at most.
    assert abs(q.mean() - expected_q) < 4 * math.sqrt(dims / 2 / total)
    sd_p = math.sqrt(np.sum(np.square(SIGMA_0 * (ALPHA_0 * x - FLOW_MEAN) / FLOW_VAR)) / num)
    assert abs(p.mean() - expected_p.mean()) < 4 * sd_p / math.sqrt(total) + 1e-3

    # Per-example values do not depend on the batch: the batch cut in two, padded.
    for part, indices, n in _padded_halves(num, images, 5):
        got = likelihood.ode(GAUSS, NO_PARAMS, part, key, num_draws=draws, indices=indices,
                             rtol=1e-4, atol=1e-4)  # fmt: skip
        lo = int(indices[0])
        np.testing.assert_array_equal(got.draws[:n], est.draws[lo : lo + n])


def _exact_log_p_latent(z_0):
    """log N(z_0; FLOW_MEAN, FLOW_VAR), summed per example: the Gaussian model's ODE density."""
    z = np.asarray(z_0, np.float64).reshape(len(z_0), -1)
    return np.sum(-0.5 * np.square(z - FLOW_MEAN) / FLOW_VAR
                  - 0.5 * math.log(2 * math.pi * FLOW_VAR), axis=1)  # fmt: skip


def test_the_ode_log_density_meets_the_tolerance_by_itself():
    """The log-density integral is one component of the solve's state beside the D of z: an
    error norm over all of them together (RMS) let it be off by 3.8 nats here (16x16x3,
    rtol = atol = 1e-3, exact values -548 and -594 nats); the norm per state leaf holds it to
    the tolerance (rtol |log p| + atol). Rademacher probes are exact for this model's diagonal
    Jacobian."""
    z_0 = FLOW_MEAN + math.sqrt(FLOW_VAR) * jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    log_p, _ = ode.ode_log_prob_latent(GAUSS, NO_PARAMS, z_0, jax.random.key(1),
                                       rtol=1e-3, atol=1e-3)  # fmt: skip
    np.testing.assert_allclose(log_p, _exact_log_p_latent(z_0), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_more_hutchinson_probes_lower_the_trace_noise_as_the_closed_form_says():
    """Gaussian probes v held along the path: for this model's Jacobian, the same multiple of
    the identity in every dimension, the estimate of log p(z_0) is the exact one plus c (sum_i
    mean_k v_ik^2 - D), c = 1/2 log(V1 / V0) the divergence integral per dimension, so its
    variance is 2 D c^2 / P with P probes."""
    num, shape = 256, (2, 2, 1)
    dims = math.prod(shape)
    z_0 = jnp.full((num, *shape), FLOW_MEAN + 0.3, jnp.float32)  # one z_0, many probe draws
    exact = _exact_log_p_latent(z_0[:1])[0]
    c = 0.5 * math.log(V1 / V0)
    variances = {}
    for probes in (1, 4):
        log_p, _ = ode.ode_log_prob_latent(GAUSS, NO_PARAMS, z_0, jax.random.key(probes),
                                           hutchinson="gaussian", num_probes=probes,
                                           rtol=1e-4, atol=1e-4)  # fmt: skip
        log_p = np.asarray(log_p, np.float64)
        expected = 2 * dims * c * c / probes
        # The sample variance of a scaled chi-square with k = D P degrees of freedom has a
        # relative standard deviation sqrt((2 + 12 / k) / num); 4 of them.
        slack = 4 * math.sqrt((2 + 12 / (dims * probes)) / num)
        assert abs(log_p.var(ddof=1) / expected - 1) < slack, (probes, log_p.var(), expected)
        assert abs(log_p.mean() - exact) < 4 * math.sqrt(expected / num)  # unbiased
        variances[probes] = log_p.var(ddof=1)
    assert variances[4] < 0.5 * variances[1]


@pytest.mark.slow
def test_an_ode_draw_is_the_same_alone_and_in_a_batch():
    """A small U-Net: example 3's draws alone and in a batch of 8 (its own index and key in
    both). The ODE solve takes the same steps to the bit; the rest of the bound (decoder,
    log q) rounds as the batch's arithmetic does."""
    model = VDM(ScoreUNet(n_layer=1, n_embd=8, dropout_rate=0.0), vocab_size=17)
    images = jax.random.randint(jax.random.key(0), (8, 8, 8, 1), 0, 17)
    params = model.init({"params": jax.random.key(1), "diffusion": jax.random.key(1)}, images,
                        train=False)  # fmt: skip
    key = jax.random.key(2)
    batch = likelihood.ode(model, params, {"image": images}, key, num_draws=2)
    alone = likelihood.ode(model, params, {"image": images[3:4]}, key, num_draws=2,
                           indices=jnp.array([3]))  # fmt: skip
    np.testing.assert_array_equal(alone.terms["log_p_latent"], batch.terms["log_p_latent"][3:4])
    np.testing.assert_array_equal(alone.nfe, batch.nfe[3:4])
    np.testing.assert_allclose(alone.draws, batch.draws[3:4], rtol=1e-6)


def _reference_bounds(xs, num_samples, num_draws, seed=0):
    """-log p(x) by quadrature and num_samples Monte Carlo draws ``[num_samples, num_draws]``
    of the per-draw bound b(z_0), z_0 ~ q(z_0|x), for the Gaussian model, in float64."""
    snr = math.exp(-GAMMA_0)

    def log_decoder(z):
        return log_softmax(-0.5 * snr * np.square(z[..., None] / ALPHA_0 - VALUES), axis=-1)

    def log_flow(z):
        return -0.5 * np.square(z - FLOW_MEAN) / FLOW_VAR - 0.5 * math.log(2 * math.pi * FLOW_VAR)

    grid = np.linspace(-12.0, 12.0, 400_001)
    log_p_values = logsumexp(log_decoder(grid) + log_flow(grid)[:, None], axis=0)
    log_p_values += math.log(grid[1] - grid[0])
    noise = np.random.default_rng(seed).standard_normal((num_samples, num_draws, len(xs)))
    z = ALPHA_0 * VALUES[xs] + SIGMA_0 * noise
    log_dec = np.take_along_axis(log_decoder(z), np.broadcast_to(xs, z.shape)[..., None], -1)
    log_q = -0.5 * np.square(noise) - math.log(SIGMA_0) - 0.5 * math.log(2 * math.pi)
    bounds = np.sum(-log_dec[..., 0] - log_flow(z) + log_q, axis=-1)
    return -np.sum(log_p_values[xs]), bounds


def _iw(draws, k):
    return math.log(k) - logsumexp(-np.asarray(draws[:, :k], np.float64), axis=1)


@pytest.mark.slow
def test_importance_weighted_bound_tightens_towards_minus_log_p_with_k():
    """A discrete data set (values 0, 7, 3, 5 in a 2x2 image) whose probabilities the model
    sets: the K-draw bound's expectation, over many keys, is the reference's at every K, at
    least -log p(x), and falls with K (Burda et al. 2016)."""
    xs = np.array([0, 7, 3, 5])
    num, max_k = 512, 16
    images = jnp.broadcast_to(jnp.asarray(xs, jnp.int32).reshape(1, 2, 2, 1), (num, 2, 2, 1))
    # Each example's index gives it its own key: 512 independent K-draw bounds of one image.
    est = likelihood.ode_iw(GAUSS, NO_PARAMS, {"image": images}, jax.random.key(9),
                            num_draws=max_k, rtol=1e-4, atol=1e-4)  # fmt: skip
    draws = np.asarray(est.draws, np.float64)
    np.testing.assert_allclose(est.nats, _iw(draws, max_k), rtol=1e-5)
    neg_log_p, ref_draws = _reference_bounds(xs, 50_000, max_k)
    means, gaps = {}, {}
    for k in (1, 2, 4, 8, 16):
        got, ref = _iw(draws, k), _iw(ref_draws, k)
        means[k], gaps[k] = got.mean(), ref.mean() - neg_log_p
        se = math.sqrt(got.var(ddof=1) / num + ref.var(ddof=1) / len(ref))
        assert abs(got.mean() - ref.mean()) < 4 * se, (k, got.mean(), ref.mean(), se)
        assert got.mean() > neg_log_p - 4 * got.std() / math.sqrt(num), k
    # Non-increasing in K: paired differences over the same draws.
    ks = sorted(means)
    for k, k2 in itertools.pairwise(ks):
        diff = _iw(draws, k) - _iw(draws, k2)
        assert diff.mean() > -3 * diff.std(ddof=1) / math.sqrt(num), (k, k2)
    diff = _iw(draws, 1) - _iw(draws, max_k)
    assert diff.mean() > 4 * diff.std(ddof=1) / math.sqrt(num)
    assert gaps[16] < 0.7 * gaps[1]
    print(
        f"\n-log p(x) = {neg_log_p:.4f} nats; K: estimate - (-log p) (reference gap): "
        + "; ".join(f"{k}: {means[k] - neg_log_p:.3f} ({gaps[k]:.3f})" for k in ks)
    )

    # The first K' draws at K are the draws at K'; ode at K averages the same draws.
    small, key = {"image": images[:4]}, jax.random.key(9)
    settings = dict(rtol=1e-4, atol=1e-4)
    iw16 = likelihood.ode_iw(GAUSS, NO_PARAMS, small, key, num_draws=16, **settings)
    iw4 = likelihood.ode_iw(GAUSS, NO_PARAMS, small, key, num_draws=4, **settings)
    avg = likelihood.estimate("ode", GAUSS, NO_PARAMS, small, key, num_draws=4, **settings)
    np.testing.assert_allclose(iw4.draws, iw16.draws[:, :4], rtol=1e-6)
    np.testing.assert_allclose(iw4.nats, _iw(np.asarray(iw16.draws), 4), rtol=1e-5)
    np.testing.assert_allclose(avg.draws, iw4.draws, rtol=1e-6)
    assert np.all(np.asarray(avg.nats) >= np.asarray(iw4.nats))  # Jensen, draw by draw
    # In a batch 128 times larger: the same draws (each solved as a batch of one). A
    # vectorised batch rounded otherwise and the solver took other steps (3.5e-3 nats apart).
    np.testing.assert_array_equal(iw16.draws, draws[:4])


# ------------------------------------------------------------------------------------------------
# A trained smoke run


@pytest.mark.slow
def test_dense_vlb_on_the_digits_smoke_run(digits_smoke_run):
    """One exact pass over the run's test split (padded batches, global indices): the dense
    bound's mean is the VLB's within standard errors, with a smaller standard error."""
    import vdm_jax

    run = vdm_jax.load_run(digits_smoke_run[0])
    key = run.eval_key
    accumulators = {"vlb": likelihood.Accumulator("vlb"),
                    "dense_vlb": likelihood.Accumulator("dense_vlb", 8)}  # fmt: skip
    start = 0
    for batch in run.eval_batches():
        size = len(batch["image"])
        indices = jnp.arange(start, start + size)
        images = {"image": jnp.asarray(batch["image"])}
        accumulators["vlb"].add(
            likelihood.vlb(run.model, run.variables, images, key, indices=indices), batch["mask"]
        )
        dense = likelihood.dense_vlb(
            run.model, run.variables, images, key, num_draws=8, indices=indices
        )
        accumulators["dense_vlb"].add(dense, batch["mask"])
        start += size
    dims = math.prod(run.info.image_shape)
    a, b = (acc.result(num_dims=dims) for acc in accumulators.values())
    assert a.num_examples == b.num_examples == 297
    assert abs(a.bpd - b.bpd) < 4 * math.hypot(a.bpd_stderr, b.bpd_stderr), (a, b)
    assert b.bpd_stderr < a.bpd_stderr
    print(
        f"\nsmoke run: vlb {a.bpd:.4f} +- {a.bpd_stderr:.4f}, dense_vlb K=8 {b.bpd:.4f} +- "
        f"{b.bpd_stderr:.4f} bits/dim, per-image spread {b.spread_bpd:.4f}"
    )


# ------------------------------------------------------------------------------------------------
# MuLAN: a schedule per pixel


class PixelGaussianModel(nn.Module):
    """The Gaussian data with MuLAN's interface: a linear schedule of its own per pixel,
    gamma_i(t) = G0[i] + (G1[i] - G0[i]) t whatever the latent c, and the optimal denoiser at
    each pixel's gamma. Its flow is affine per pixel, so log p_ODE(z_0) is a closed form."""

    g0: tuple = (-5.0, -4.0, -6.0, -3.0)
    g1: tuple = (5.0, 4.0, 6.0, 3.0)

    def gamma_and_derivative(self, t, c):
        g0, g1 = (jnp.asarray(g, jnp.float32).reshape(2, 2, 1) for g in (self.g0, self.g1))
        t = expand_gamma(t, 4)
        return g0 + (g1 - g0) * t, jnp.broadcast_to(g1 - g0, t.shape[:1] + g0.shape)

    def predict_noise(self, z, gamma_pixels, c, train=False):
        return _optimal_eps(z, gamma_pixels)


def _pixel_flow_log_p(model, z_0):
    """Sum over pixels of log N(z_0i; M0_i - sqrt(V0_i / V1_i) M1_i, V0_i / V1_i)."""
    out = 0.0
    for i, (g0, g1) in enumerate(zip(model.g0, model.g1, strict=True)):
        (m0, v0), (m1, v1) = _moments(g0), _moments(g1)
        mean, var = m0 - math.sqrt(v0 / v1) * m1, v0 / v1
        z = np.asarray(z_0, np.float64).reshape(len(z_0), -1)[:, i]
        out = out - 0.5 * np.square(z - mean) / var - 0.5 * math.log(2 * math.pi * var)
    return out


@pytest.mark.slow
def test_the_ode_of_a_schedule_per_pixel_matches_its_closed_form_and_the_univariate_one():
    """log p_ODE(z_0 | c) with a different schedule in every pixel is the product of the
    pixels' affine flows; with every pixel's schedule the VDM's, it is the VDM's figure."""
    z_0 = 0.1 + 0.05 * jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
    c = jnp.zeros((3, 1))
    model = PixelGaussianModel()
    log_p, _ = ode.ode_log_prob_latent(model, NO_PARAMS, z_0, jax.random.key(1), latents=c)
    np.testing.assert_allclose(log_p, _pixel_flow_log_p(model, z_0), rtol=1e-4, atol=1e-3)
    same = PixelGaussianModel(g0=(GAMMA_0,) * 4, g1=(GAMMA_1,) * 4)
    log_p_same, _ = ode.ode_log_prob_latent(same, NO_PARAMS, z_0, jax.random.key(1), latents=c)
    log_p_vdm, _ = ode.ode_log_prob_latent(GAUSS, NO_PARAMS, z_0, jax.random.key(1))
    np.testing.assert_allclose(log_p_same, log_p_vdm, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(log_p_same, _exact_log_p_latent(z_0), rtol=1e-4, atol=1e-3)


def test_ode_iw_refuses_a_topk_latent():
    model = _tiny_mulan("topk")
    batch = {"image": jnp.zeros((1, 4, 4, 1), jnp.int32)}
    with pytest.raises(UserError, match=r"'ode_iw' estimator weighs each draw of the latent c"):
        likelihood.ode_iw(model, NO_PARAMS, batch, jax.random.key(0), num_draws=2)


def _tiny_mulan(kind):
    from vdm_jax.maths import mulan as mulan_maths
    from vdm_jax.models import mulan

    common = dict(norm_groups=4, dropout_rate=0.0)
    return mulan.MuLAN(
        score_net=mulan.LatentConditionedUNet(n_layer=1, n_embd=8, latent_size=3, **common),
        schedule=mulan_maths.PolynomialSchedule(image_shape=(4, 4, 1), n_features=8),
        encoder=mulan.LatentEncoder(latent_size=3, kind=kind, n_layer=1, n_embd=8, **common),
        latent_k=1,
        vocab_size=16,
    )


@pytest.mark.slow
def test_mulan_dense_vlb_and_ode_add_the_latent_term():
    """A tiny gaussian MuLAN: dense_vlb's draws are the four terms' sum (the latent's KL the
    same in every draw: added once per image); the ODE draws add log q(c|x) - log p(c) of
    their own c; ode_iw at K combines the same draws."""
    model = _tiny_mulan("gaussian")
    images = jax.random.randint(jax.random.key(0), (2, 4, 4, 1), 0, 16)
    keys = {"params": jax.random.key(1), "diffusion": jax.random.key(1)}
    variables = jax.jit(lambda keys: model.init(keys, images, train=False))(keys)
    batch, key = {"image": images}, jax.random.key(2)
    dense = likelihood.dense_vlb(model, variables, batch, key, num_draws=4)
    terms = {k: np.asarray(v) for k, v in dense.terms.items()}
    assert set(terms) == {"latent", "prior", "reconstruction", "diffusion"}
    np.testing.assert_allclose(dense.nats, sum(terms.values()), rtol=1e-5)
    draw = jax.jit(lambda v, k: model.apply(v, images, k, method=model.draw_latent))
    kl = draw(variables, jax.random.key(0))[1]
    np.testing.assert_allclose(terms["latent"], kl, rtol=1e-5)
    est = likelihood.ode(model, variables, batch, key, num_draws=2, rtol=1e-3, atol=1e-3)
    iw = likelihood.ode_iw(model, variables, batch, key, num_draws=2, rtol=1e-3, atol=1e-3)
    assert set(est.terms) == {"latent", "reconstruction", "log_p_latent", "log_q_latent"}
    np.testing.assert_array_equal(est.draws, iw.draws)
    np.testing.assert_allclose(iw.nats, _iw(np.asarray(est.draws), 2), rtol=1e-5)
    t = est.terms
    total = t["latent"] + t["reconstruction"] - t["log_p_latent"] + t["log_q_latent"]
    np.testing.assert_allclose(est.nats, total, rtol=1e-5)
    assert np.all(np.isfinite(est.draws)) and np.all(est.nfe > 2)
