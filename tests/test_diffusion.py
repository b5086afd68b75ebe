"""The forward process and posterior against closed forms and high-precision references."""

from decimal import Decimal, getcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vdm_jax as vdm

getcontext().prec = 50


def _decimal_alpha2(g: float) -> Decimal:
    return 1 / (1 + Decimal(float(g)).exp())


def _gamma_pairs():
    """Pairs s < t over [-13.3, 5]: adjacent steps of T = 1000 and T = 10^5, and wide gaps."""
    rng = np.random.default_rng(0)
    grid = np.linspace(-13.3, 5.0, 1001, dtype=np.float32)
    fine = np.float32(-13.3) + np.float32(18.3e-5) * np.arange(0, 100001, 997, dtype=np.float32)
    wide = np.sort(rng.uniform(-13.3, 5.0, size=(200, 2)).astype(np.float32), axis=1)
    wide = wide[wide[:, 0] < wide[:, 1]]
    gs = np.concatenate([grid[:-1], fine[:-1], wide[:, 0]])
    gt = np.concatenate([grid[1:], fine[1:] + np.float32(18.3e-5), wide[:, 1]])
    keep = gs < gt
    return gs[keep], gt[keep]


def test_transition_is_accurate_in_float32_over_the_paper_range():
    gs, gt = _gamma_pairs()
    mean_coef, var = jax.jit(vdm.transition)(gs, gt)
    mean_coef, var = np.asarray(mean_coef, np.float64), np.asarray(var, np.float64)
    ref_var = np.array(
        [float(1 - _decimal_alpha2(t) / _decimal_alpha2(s)) for s, t in zip(gs, gt, strict=True)]
    )
    ref_coef = np.array(
        [
            float((_decimal_alpha2(t) / _decimal_alpha2(s)).sqrt())
            for s, t in zip(gs, gt, strict=True)
        ]
    )
    assert np.all(var > 0)
    assert np.max(np.abs(var / ref_var - 1)) < 1e-4
    assert np.max(np.abs(mean_coef / ref_coef - 1)) < 1e-6
    # var == 1 - mean_coef^2 (checked in float64 against the float32 outputs).
    np.testing.assert_allclose(var, 1 - mean_coef**2, rtol=1e-3, atol=1e-7)


def test_q_steps_compose_to_the_marginal_exactly():
    gammas = np.asarray(vdm.fixed_linear(jnp.linspace(0.0, 1.0, 1001)))
    mean_coef, var = vdm.transition(gammas[:-1], gammas[1:])
    # Run the recursion in float64 on the float32 coefficients.
    alpha, sigma = (np.float64(v) for v in vdm.alpha_sigma(gammas[0]))
    m, v = alpha, sigma**2
    for a, s2 in zip(np.asarray(mean_coef, np.float64), np.asarray(var, np.float64), strict=True):
        m, v = a * m, a * a * v + s2
    alpha_1, sigma_1 = vdm.alpha_sigma(gammas[-1])
    np.testing.assert_allclose(m, float(alpha_1), rtol=1e-4)
    np.testing.assert_allclose(v, float(sigma_1) ** 2, rtol=1e-5)


def test_q_steps_compose_to_the_marginal_by_sampling():
    n, steps = 200_000, 20
    gammas = vdm.fixed_linear(jnp.linspace(0.0, 1.0, steps + 1), -6.0, 2.0)
    x = jnp.full((n, 1), 0.7)
    keys = jax.random.split(jax.random.key(1), steps + 1)
    z = vdm.q_sample(x, gammas[0], jax.random.normal(keys[0], x.shape))
    for i in range(steps):
        z = vdm.q_step(z, gammas[i], gammas[i + 1], jax.random.normal(keys[i + 1], x.shape))
    alpha_1, sigma_1 = vdm.alpha_sigma(gammas[-1])
    stderr = float(sigma_1) / np.sqrt(n)
    assert abs(float(jnp.mean(z)) - 0.7 * float(alpha_1)) < 5 * stderr
    assert abs(float(jnp.var(z)) / float(sigma_1) ** 2 - 1) < 5 * np.sqrt(2 / n)


def test_alpha_sigma_snr():
    g = jnp.linspace(-13.3, 5.0, 101)
    alpha, sigma = vdm.alpha_sigma(g)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(vdm.snr(g), alpha**2 / sigma**2, rtol=1e-5)


def test_posterior_equals_gaussian_conditioning_of_the_joint():
    rng = np.random.default_rng(2)
    batch = 64
    gs = rng.uniform(-13.3, 4.0, batch).astype(np.float32)
    gt = (gs + rng.uniform(1e-3, 5.0, batch)).astype(np.float32)
    x = rng.uniform(-1, 1, (batch, 3, 2)).astype(np.float32)
    z_t = rng.normal(size=(batch, 3, 2)).astype(np.float32)
    mean, var = vdm.posterior(z_t, x, gs, gt)

    # The joint of (z_s, z_t) given x, from the marginals and the transition, in float64.
    g_s, g_t = gs.astype(np.float64), gt.astype(np.float64)
    a_s, a_t = np.sqrt(1 / (1 + np.exp(g_s))), np.sqrt(1 / (1 + np.exp(g_t)))
    v_s, v_t = 1 / (1 + np.exp(-g_s)), 1 / (1 + np.exp(-g_t))
    cov_st = (a_t / a_s) * v_s
    ref_mean = a_s[:, None, None] * x + (cov_st / v_t)[:, None, None] * (
        z_t - a_t[:, None, None] * x
    )
    ref_var = v_s - cov_st**2 / v_t
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(var)[:, 0, 0], ref_var, rtol=1e-4)
    assert var.shape == (batch, 1, 1)


def test_ancestral_step_with_the_true_noise_samples_the_posterior():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (8, 4, 4, 3)).astype(np.float32)
    eps = rng.normal(size=x.shape).astype(np.float32)
    noise = rng.normal(size=x.shape).astype(np.float32)
    gs = np.linspace(-10.0, 2.0, 8, dtype=np.float32)
    gt = gs + np.float32(0.5)
    z_t = vdm.q_sample(x, gt, eps)
    np.testing.assert_allclose(vdm.predict_x(z_t, eps, gt), x, atol=2e-5)
    mean, var = vdm.posterior(z_t, x, gs, gt)
    z_s = vdm.ancestral_step(z_t, eps, gs, gt, noise)
    np.testing.assert_allclose(z_s, mean + np.sqrt(var) * noise, rtol=1e-5, atol=1e-5)


def test_encode_maps_to_bin_centres():
    v = 256
    enc = np.asarray(vdm.encode(np.arange(v, dtype=np.uint8), v))
    assert enc.dtype == np.float32
    np.testing.assert_allclose(enc[[0, -1]], [-1 + 1 / v, 1 - 1 / v], rtol=1e-6)
    np.testing.assert_allclose(np.diff(enc), 2 / v, rtol=1e-4)
    with pytest.raises(ValueError, match="vocab_size must be at least 2, got 1"):
        vdm.encode(np.zeros(3), 1)


def test_gamma_broadcasts_over_leading_axes_and_rejects_extra_axes():
    x = jnp.ones((4, 2, 2, 1))
    g = jnp.array([-5.0, -1.0, 0.0, 3.0])
    z = vdm.q_sample(x, g, jnp.zeros_like(x))
    np.testing.assert_allclose(z[:, 0, 0, 0], vdm.alpha_sigma(g)[0], rtol=1e-6)
    scalar = vdm.q_sample(x, -1.0, jnp.zeros_like(x))
    np.testing.assert_allclose(scalar, vdm.alpha_sigma(-1.0)[0] * x, rtol=1e-6)
    with pytest.raises(ValueError, match=r"gamma has shape \(4, 1, 1, 1, 1\)"):
        vdm.q_sample(x, jnp.zeros((4, 1, 1, 1, 1)), x)


@pytest.mark.parametrize(
    "fn",
    [
        lambda z, x, e, gs, gt: vdm.posterior(z, x, gs, gt),
        lambda z, x, e, gs, gt: vdm.ancestral_step(z, e, gs, gt, x),
        lambda z, x, e, gs, gt: vdm.q_step(z, gs, gt, e),
        lambda z, x, e, gs, gt: vdm.predict_x(z, e, gt),
    ],
)
def test_jit_and_eager_agree(fn):
    rng = np.random.default_rng(4)
    z, x, e = (rng.normal(size=(5, 3, 3, 2)).astype(np.float32) for _ in range(3))
    gs = np.linspace(-13.0, 3.0, 5, dtype=np.float32)
    gt = gs + np.float32(1e-2)
    eager = fn(z, x, e, gs, gt)
    jitted = jax.jit(fn)(z, x, e, gs, gt)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), eager, jitted)


def test_eps_x_v_and_score_conversions_round_trip_and_match_the_definitions():
    from vdm_jax.maths import diffusion

    key_x, key_eps, key_hat = jax.random.split(jax.random.key(7), 3)
    gamma = jnp.linspace(-13.3, 5.0, 64)
    x = jax.random.uniform(key_x, (64, 3, 3, 2), minval=-1.0, maxval=1.0)
    eps = jax.random.normal(key_eps, x.shape)
    z = vdm.q_sample(x, gamma, eps)
    alpha, sigma = vdm.alpha_sigma(gamma[:, None, None, None])
    v = alpha * eps - sigma * x
    # The truths convert into each other (definitions of v, x and the score).
    np.testing.assert_allclose(diffusion.v_from_eps(z, eps, gamma), v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(diffusion.eps_from_v(z, v, gamma), eps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(diffusion.x_from_v(z, v, gamma), x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(diffusion.v_from_x(z, x, gamma), v, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(diffusion.eps_from_x(z, x, gamma), eps, rtol=1e-3, atol=1e-3)
    # Round trips of an arbitrary prediction, through every parameterisation.
    eps_hat = jax.random.normal(key_hat, x.shape)
    for kind in diffusion.PARAMETERIZATIONS:
        back = diffusion.to_eps(diffusion.from_eps(eps_hat, z, gamma, kind), z, gamma, kind)
        tol = 2e-2 if kind == "x" else 1e-5  # x loses eps's digits where sigma is ~1e-3
        np.testing.assert_allclose(back, eps_hat, rtol=tol, atol=tol, err_msg=kind)
    score = diffusion.score_from_eps(eps_hat, gamma)
    np.testing.assert_allclose(score * sigma, -eps_hat, rtol=1e-6)
    np.testing.assert_allclose(diffusion.eps_from_score(score, gamma), eps_hat, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown parameterization 'y'"):
        diffusion.to_eps(eps_hat, z, gamma, "y")
