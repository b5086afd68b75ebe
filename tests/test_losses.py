"""The VLB terms against float64 references and the paper's closed forms."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

import vdm_jax as vdm


def test_prior_kl_matches_float64_closed_form():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (16, 4, 4, 3)).astype(np.float32)
    gamma_1 = np.linspace(-2.0, 12.0, 16, dtype=np.float32)
    kl = vdm.prior_kl(x, gamma_1)
    g = gamma_1.astype(np.float64)[:, None, None, None]
    a2, s2 = 1 / (1 + np.exp(g)), 1 / (1 + np.exp(-g))
    ref = np.sum(0.5 * (s2 + a2 * x.astype(np.float64) ** 2 - 1 - np.log(s2)), axis=(1, 2, 3))
    assert kl.shape == (16,)
    np.testing.assert_allclose(kl, ref, rtol=1e-5)
    assert np.all(np.asarray(kl) > 0)


@pytest.mark.parametrize("vocab_size", [17, 256])
def test_decoder_matches_float64_reference_and_normalises(vocab_size):
    rng = np.random.default_rng(1)
    x_int = rng.integers(0, vocab_size, (6, 3, 3, 1))
    gamma_0 = np.array([-13.3, -10.0, -7.0, -4.0, -1.0, 2.0], np.float32)
    eps = rng.normal(size=x_int.shape).astype(np.float32)
    x = vdm.encode(x_int, vocab_size)
    z_0 = vdm.q_sample(x, gamma_0, eps)

    log_probs = vdm.decoder_log_probs(z_0, gamma_0, vocab_size)
    assert log_probs.shape == (*x_int.shape, vocab_size)
    np.testing.assert_allclose(jnp.sum(jnp.exp(log_probs), -1), 1.0, rtol=1e-5)

    g = gamma_0.astype(np.float64)[:, None, None, None, None]
    alpha, sigma = np.sqrt(1 / (1 + np.exp(g))), np.sqrt(1 / (1 + np.exp(-g)))
    values = (2 * (np.arange(vocab_size) + 0.5)) / vocab_size - 1
    z = np.asarray(z_0, np.float64)[..., None]
    ref_log_probs = log_softmax(-0.5 * ((z - alpha * values) / sigma) ** 2, axis=-1)
    ref_nll = -np.sum(np.take_along_axis(ref_log_probs, x_int[..., None], -1), axis=(1, 2, 3, 4))
    nll = vdm.reconstruction_nll(x_int, z_0, gamma_0, vocab_size)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-4, atol=1e-5)
    # Almost no reconstruction error at the paper's gamma_min, much more at high noise.
    assert float(nll[0]) < 0.05 < float(nll[-1])


# Jitted: op by op, every operation on these arrays of up to 400,000 examples compiles alone.
_gamma_and_derivative = jax.jit(vdm.gamma_and_derivative, static_argnums=0)


def _smooth_error(t):
    """A smooth, deterministic ||eps - eps_hat||^2 as a function of t."""
    return 1.5 + jnp.sin(3.0 * t)


def test_discrete_loss_approaches_continuous_loss_as_T_grows():
    schedule = vdm.MonotonicSchedule(n_features=8)
    params = schedule.init(jax.random.key(0), jnp.zeros(()))
    params = jax.tree.map(  # a clearly non-linear shape
        lambda p: p + jax.random.normal(jax.random.key(1), p.shape), params
    )
    gamma = lambda t: schedule.apply(params, t)  # noqa: E731
    eps = jnp.ones((1, 1))

    def eps_hat(t):
        return eps - jnp.sqrt(_smooth_error(t))[:, None]

    @functools.partial(jax.jit, static_argnums=0)
    def discrete(num_steps):
        t = jnp.arange(1, num_steps + 1) / num_steps
        s = t - 1.0 / num_steps
        losses = vdm.diffusion_loss_discrete(eps, eps_hat(t), gamma(s), gamma(t), num_steps)
        return jnp.mean(losses)  # the exact expectation over i ~ U{1..T}

    nodes, weights = np.polynomial.legendre.leggauss(200)
    t = jnp.asarray(0.5 * (nodes + 1), jnp.float32)
    _, dgamma = _gamma_and_derivative(gamma, t)
    continuous = float(
        np.sum(0.5 * weights * vdm.diffusion_loss_continuous(eps, eps_hat(t), dgamma))
    )
    gaps = [float(discrete(num_steps)) - continuous for num_steps in (10, 100, 1000)]
    print(f"L_inf = {continuous:.4f} nats; L_T - L_inf for T = 10, 100, 1000: {gaps}")
    # More steps give a tighter bound (the paper's result), with a first-order gap ~ 1/T.
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert gaps[1] / gaps[2] > 5
    assert gaps[2] < 0.02 * continuous


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _gaussian_optimal_loss(schedule_fn, key, n, dims, data_var):
    """Per-example continuous diffusion loss for x ~ N(0, data_var I) with the optimal denoiser."""
    k_t, k_x, k_e = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (n,))
    x = jnp.sqrt(data_var) * jax.random.normal(k_x, (n, dims))
    eps = jax.random.normal(k_e, (n, dims))
    gamma, dgamma = _gamma_and_derivative(schedule_fn, t)
    z = vdm.q_sample(x, gamma, eps)
    alpha, sigma = vdm.alpha_sigma(gamma[:, None])
    eps_hat = sigma * z / (alpha**2 * data_var + sigma**2)  # E[eps | z]
    return vdm.diffusion_loss_continuous(eps, eps_hat, dgamma)


def test_continuous_loss_is_invariant_to_the_schedule_shape():
    dims, data_var = 4, 0.25
    linear = vdm.LearnedLinearSchedule()
    lin_params = linear.init(jax.random.key(0), jnp.zeros(()))
    mono = vdm.MonotonicSchedule(n_features=16)
    mono_params = mono.init(jax.random.key(0), jnp.zeros(()))
    # Perturb the shape layers only, keeping the endpoints.
    for i, (layer, scale) in enumerate((("l2", 3.0), ("l3", 30.0))):
        mono_params["params"][layer] = jax.tree.map(
            lambda p, i=i, scale=scale: p + scale * jax.random.normal(jax.random.key(i), p.shape),
            mono_params["params"][layer],
        )
    lin_fn = lambda t: linear.apply(lin_params, t)  # noqa: E731
    mono_fn = lambda t: mono.apply(mono_params, t)  # noqa: E731
    grid = jnp.linspace(0.0, 1.0, 101)
    assert float(jnp.max(jnp.abs(mono_fn(grid) - lin_fn(grid)))) > 0.5  # clearly not linear

    # Closed form: dims/2 * integral of sigmoid(log data_var - gamma) d gamma over the endpoints.
    a = math.log(data_var)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    closed = 0.5 * dims * (softplus(a + 13.3) - softplus(a - 5.0))

    nodes, weights = np.polynomial.legendre.leggauss(400)
    t = jnp.asarray(0.5 * (nodes + 1), jnp.float32)
    for fn in (lin_fn, mono_fn):
        gamma, dgamma = _gamma_and_derivative(fn, t)
        integrand = 0.5 * dims * dgamma * jax.nn.sigmoid(a - gamma)
        quadrature = float(np.sum(0.5 * weights * np.asarray(integrand, np.float64)))
        np.testing.assert_allclose(quadrature, closed, rtol=1e-4)

        losses = _gaussian_optimal_loss(fn, jax.random.key(3), 400_000, dims, data_var)
        stderr = float(jnp.std(losses)) / math.sqrt(losses.shape[0])
        assert abs(float(jnp.mean(losses)) - closed) < 4 * stderr


def test_bits_per_dim_and_argument_checks():
    np.testing.assert_allclose(vdm.bits_per_dim(jnp.float32(3072 * math.log(2)), 3072), 1.0)
    with pytest.raises(ValueError, match="num_dims must be a positive integer, got 0"):
        vdm.bits_per_dim(1.0, 0)
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got 0"):
        vdm.diffusion_loss_discrete(jnp.ones((1, 2)), jnp.ones((1, 2)), 0.0, 1.0, 0)
