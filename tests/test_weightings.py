"""Weighted diffusion losses against closed forms on Gaussian data (Kingma & Gao 2023).

For x ~ N(0, s^2 I) and its optimal denoiser eps_hat = E[eps | z_lambda], the error per
dimension is E||eps - eps_hat||^2 / D = s^2 e^lambda / (1 + s^2 e^lambda), so every weighted
loss is the quadrature 1/2 D int w(lambda) s^2 e^lambda / (1 + s^2 e^lambda) dlambda.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.errors import UserError
from vdm_jax.maths import diffusion, losses, schedules, weightings

S = 0.7
DIMS = 4
GAMMA_0, GAMMA_1 = schedules.GAMMA_MIN, schedules.GAMMA_MAX  # lambda in [-5, 13.3]


def _error_per_dim(lam):
    """E (eps - eps_hat)^2 per dimension for the optimal denoiser, float64."""
    return S**2 * np.exp(lam) / (1.0 + S**2 * np.exp(lam))


def _integrate(fn, lo=-GAMMA_1, hi=-GAMMA_0, pieces=200):
    """int_lo^hi fn(lambda) dlambda by composite 16-point Gauss-Legendre; fn vectorised."""
    nodes, weights = np.polynomial.legendre.leggauss(16)
    edges = np.linspace(lo, hi, pieces + 1)
    half = 0.5 * np.diff(edges)[:, None]
    lam = (0.5 * (edges[:-1] + edges[1:]))[:, None] + half * nodes
    return float(np.sum(half * weights * fn(lam)))


def _quadrature(weighting):
    """1/2 D int w(lambda) s^2 e^lambda / (1 + s^2 e^lambda) dlambda, the exact weighted loss."""
    w = lambda lam: np.asarray(weighting(jnp.asarray(lam, jnp.float32)), np.float64)  # noqa: E731
    return 0.5 * DIMS * _integrate(lambda lam: w(lam) * _error_per_dim(lam))


def _gaussian_batch(key, gamma):
    """eps and the optimal eps_hat for x ~ N(0, S^2 I), one example per gamma ``[B]``."""
    k_x, k_eps = jax.random.split(key)
    x = S * jax.random.normal(k_x, (gamma.shape[0], DIMS))
    eps = jax.random.normal(k_eps, x.shape)
    z = diffusion.q_sample(x, gamma, eps)
    alpha, sigma = diffusion.alpha_sigma(gamma[:, None])
    return eps, sigma * z / (alpha**2 * S**2 + sigma**2)


@functools.cache  # on first use, not while pytest collects the module
def _monotonic_schedule():
    """A clearly non-linear schedule with the endpoints of the linear one."""
    schedule = schedules.MonotonicSchedule(GAMMA_0, GAMMA_1, n_features=8)
    params = schedule.init(jax.random.key(0), jnp.zeros(()))
    params = jax.tree_util.tree_map_with_path(  # the shape layers only, not the endpoints
        lambda path, p: p + 2.0 * jax.random.normal(jax.random.key(1), p.shape)
        if "l2" in str(path) or "l3" in str(path) else p,
        params,
    )  # fmt: skip
    return lambda t: schedule.apply(params, t)


#: Schedule makers: each returns the function t -> gamma(t).
SCHEDULES = {
    "linear": lambda: functools.partial(
        schedules.fixed_linear, gamma_min=GAMMA_0, gamma_max=GAMMA_1
    ),
    "monotonic": _monotonic_schedule,
}
WEIGHTINGS = {
    "elbo": weightings.get_weighting("elbo"),
    "sigmoid": weightings.get_weighting("sigmoid", bias=1.0),
    "v_mse": weightings.get_weighting("v_mse"),
    "edm": weightings.get_weighting("edm"),
    "min_snr": weightings.get_weighting("min_snr", gamma=5.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_monte_carlo_weighted_loss_matches_quadrature_for_any_schedule(schedule):
    gamma_fn = SCHEDULES[schedule]()
    n = 40_000
    t = (jax.random.uniform(jax.random.key(2), ()) + jnp.arange(n) / n) % 1.0  # antithetic
    gamma, dgamma_dt = schedules.gamma_and_derivative(gamma_fn, t)
    eps, eps_hat = _gaussian_batch(jax.random.key(3), gamma)
    for name, weighting in WEIGHTINGS.items():
        per_example = np.asarray(
            losses.weighted_diffusion_loss(eps, eps_hat, gamma, dgamma_dt, weighting), np.float64
        )
        mean, stderr = per_example.mean(), per_example.std() / math.sqrt(n)
        expected = _quadrature(weighting)
        assert abs(mean - expected) < 4 * stderr, (schedule, name, mean, expected, stderr)


def test_weighted_loss_at_weight_one_is_the_continuous_loss_bit_for_bit():
    gamma = jnp.linspace(GAMMA_0, GAMMA_1, 64)
    eps, eps_hat = _gaussian_batch(jax.random.key(4), gamma)
    dgamma_dt = jnp.linspace(0.5, 30.0, 64)
    reference = losses.diffusion_loss_continuous(eps, eps_hat, dgamma_dt)
    for weight in (1.0, jnp.ones(64), weightings.get_weighting("elbo")):
        loss = losses.weighted_diffusion_loss(eps, eps_hat, gamma, dgamma_dt, weight)
        np.testing.assert_array_equal(loss, reference)
        jitted = jax.jit(losses.weighted_diffusion_loss, static_argnums=4)
        if not isinstance(weight, jax.Array):
            np.testing.assert_array_equal(
                jitted(eps, eps_hat, gamma, dgamma_dt, weight), jax.jit(
                    losses.diffusion_loss_continuous)(eps, eps_hat, dgamma_dt),
            )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(weightings.WEIGHTINGS))
def test_monotone_flags_and_the_noise_augmented_elbo_identity(name):
    weighting = weightings.get_weighting(name)
    lam = jnp.linspace(-GAMMA_1, -GAMMA_0, 4001)
    dw = np.asarray(jax.vmap(jax.grad(weighting))(lam))
    w = np.asarray(weighting(lam))
    assert np.all(w > 0) and np.all(np.isfinite(dw)), name
    if weighting.monotone:
        assert np.all(dw <= 1e-6 * np.max(np.abs(dw))), name
    else:
        assert np.max(dw) > 1e-3 * np.max(np.abs(dw)), name
        return
    # L_w = w(lambda_max) L(lambda_max) + int (-w'(lambda)) L(lambda) dlambda, with L(lambda)
    # the ELBO's diffusion loss of the data noised to level lambda, here in closed form.
    lam_min, lam_max = -GAMMA_1, -GAMMA_0

    def elbo(lam):
        return 0.5 * DIMS * (np.log1p(S**2 * np.exp(lam)) - np.log1p(S**2 * np.exp(lam_min)))

    dw_fn = jax.vmap(jax.grad(weighting))

    def integrand(l):
        dw = np.asarray(dw_fn(jnp.asarray(l.ravel(), jnp.float32)), np.float64).reshape(l.shape)
        return -dw * elbo(l)

    mixture = _integrate(integrand, pieces=400)
    identity = float(weighting(jnp.float32(lam_max))) * elbo(lam_max) + mixture
    np.testing.assert_allclose(identity, _quadrature(weighting), rtol=2e-4)


def test_edm_monotonic_is_edm_from_its_peak_on(optimized):
    edm, mono = weightings.get_weighting("edm"), weightings.get_weighting("edm_monotonic")
    lam = jnp.linspace(-10.0, 15.0, 2001)
    peak = float(lam[jnp.argmax(edm(lam))])
    high = lam > peak + 0.05
    np.testing.assert_allclose(mono(lam)[high], edm(lam)[high], rtol=1e-6)
    np.testing.assert_allclose(mono(lam)[~high], jnp.max(edm(lam)), rtol=1e-4)


def test_weightings_are_hashable_values_and_check_their_parameters():
    assert weightings.get_weighting("sigmoid", bias=2) == weightings.get_weighting(
        "sigmoid", bias=2.0
    )
    assert hash(weightings.get_weighting("edm")) == hash(
        weightings.get_weighting("edm", sigma_data=0.5)
    )
    assert weightings.get_weighting("sigmoid", bias=1.0) != weightings.get_weighting(
        "sigmoid", bias=2.0
    )
    np.testing.assert_allclose(
        weightings.get_weighting("sigmoid", bias=2.0)(jnp.array([2.0, -50.0])), [0.5, 1.0]
    )
    with pytest.raises(UserError, match="unknown weighting 'sigmod'"):
        weightings.get_weighting("sigmod")
    with pytest.raises(UserError, match=r"no parameter\(s\) \['b'\]"):
        weightings.get_weighting("sigmoid", b=1.0)
    with pytest.raises(UserError, match="gamma > 0"):
        weightings.get_weighting("min_snr", gamma=0.0)


@pytest.mark.slow
def test_adaptive_noise_levels_keep_the_mean_and_lower_the_variance(capsys):
    weighting = weightings.get_weighting("sigmoid", bias=1.0)
    n, num_bins = 20_000, 32
    expected = _quadrature(weighting)
    u = (jax.random.uniform(jax.random.key(5), ()) + jnp.arange(n) / n) % 1.0

    def estimate(histogram, key):
        probs = weightings.histogram_probs(histogram, floor=0.05)
        gamma, density, bins = weightings.sample_from_histogram(probs, GAMMA_0, GAMMA_1, u)
        eps, eps_hat = _gaussian_batch(key, gamma)
        weight = weighting(-gamma)
        loss = losses.importance_weighted_diffusion_loss(eps, eps_hat, weight, density)
        # The same estimate, as the piecewise-linear schedule with gamma'(u) = 1 / density.
        as_schedule = losses.weighted_diffusion_loss(eps, eps_hat, gamma, 1.0 / density, weight)
        np.testing.assert_allclose(loss, as_schedule, rtol=1e-6)
        values = weight * jnp.sum(jnp.square(eps - eps_hat), axis=-1)
        return np.asarray(loss, np.float64), bins, values

    histogram = jnp.ones((num_bins,), jnp.float32)  # starts uniform in gamma (= linear t)
    uniform, _, _ = estimate(histogram, jax.random.key(6))
    for step in range(30):
        _, bins, values = estimate(histogram, jax.random.key(100 + step))
        histogram = weightings.update_histogram(histogram, bins, values, decay=0.8)
    adapted, _, _ = estimate(histogram, jax.random.key(7))
    for sample in (uniform, adapted):
        assert abs(sample.mean() - expected) < 4 * sample.std() / math.sqrt(n)
    with capsys.disabled():
        print(f"\nper-example variance: uniform {uniform.var():.4g}, adapted {adapted.var():.4g}")
    assert adapted.var() < 0.7 * uniform.var()


@pytest.mark.slow
def test_histogram_floor_sampling_and_update():
    probs = weightings.histogram_probs(jnp.array([0.0, 0.0, 3.0, 1.0]), floor=0.2)
    np.testing.assert_allclose(probs, [0.05, 0.05, 0.65, 0.25], rtol=1e-6)
    np.testing.assert_allclose(weightings.histogram_probs(jnp.zeros(4), 0.5), 0.25)
    u = jnp.array([0.0, 0.05, 0.1, 0.75, 0.999999])
    gamma, density, bins = weightings.sample_from_histogram(probs, -2.0, 2.0, u)
    np.testing.assert_array_equal(bins, [0, 1, 2, 2, 3])
    np.testing.assert_allclose(gamma, [-2.0, -1.0, 0.0, 0.0 + 0.65 / 0.65, 2.0], atol=1e-5)
    np.testing.assert_allclose(density, np.asarray(probs)[np.asarray(bins)] * 4 / 4.0)
    updated = weightings.update_histogram(
        jnp.array([1.0, 1.0, 1.0, 1.0]), jnp.array([0, 0, 2]), jnp.array([3.0, 5.0, 2.0]), 0.5
    )
    np.testing.assert_allclose(updated, [2.5, 1.0, 1.5, 1.0])
    with pytest.raises(UserError, match="floor"):
        weightings.histogram_probs(jnp.ones(3), 0.0)
    with pytest.raises(UserError, match="decay"):
        weightings.update_histogram(jnp.ones(3), jnp.zeros(1, int), jnp.ones(1), 1.0)
