"""Tests of vdm_jax.models.sampling.

Most tests drive the samplers with ``GaussianModel``: data x ~ N(mu, s^2) independently in
every dimension and the exact optimal denoiser E[eps | z_t], so every marginal q(z_t) is known in
closed form: N(m_t, v_t) with m_t = alpha_t mu, v_t = alpha_t^2 s^2 + sigma_t^2. The
probability-flow ODE of that model is the affine map z_t = m_t + sqrt(v_t / v_0) (z_0 - m_0),
so the density it gives z_0 (starting from the N(0, I) prior, not from q(z_1)) is known too.
"""

from __future__ import annotations

import itertools
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.maths import losses
from vdm_jax.maths.diffusion import expand_gamma
from vdm_jax.maths.schedules import GAMMA_MAX, GAMMA_MIN, FixedLinearSchedule
from vdm_jax.models import ode, sampling
from vdm_jax.models.unet import ScoreUNet
from vdm_jax.models.vdm import VDM

MU, S = 0.3, 0.5


class GaussianModel(nn.Module):
    """A VDM-like module whose data are N(mu, s^2) per dimension, with the optimal denoiser."""

    mu: float = MU
    s: float = S
    vocab_size: int = 256
    schedule: nn.Module = FixedLinearSchedule()

    def gamma(self, t):
        return self.schedule(t)

    def endpoints(self):
        return self.schedule.endpoints()

    def predict_noise(self, z, gamma_t, labels=None, *, train=False):
        del train
        if labels is not None:  # the samplers must hand over one label per example
            assert labels.shape == (z.shape[0],), (labels.shape, z.shape)
        g = expand_gamma(gamma_t, z.ndim)
        alpha2, sigma2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
        return jnp.sqrt(sigma2) * (z - jnp.sqrt(alpha2) * self.mu) / (alpha2 * self.s**2 + sigma2)

    def decode_log_probs(self, z_0):
        gamma_0, _ = self.endpoints()
        return losses.decoder_log_probs(z_0, gamma_0, self.vocab_size)


GAUSS = GaussianModel()
NO_PARAMS: dict = {}


def _moments(gamma: float, mu: float = MU, s: float = S) -> tuple[float, float]:
    """Mean and variance of q(z_t) for the Gaussian data at gamma_t."""
    alpha2, sigma2 = 1.0 / (1.0 + math.exp(gamma)), 1.0 / (1.0 + math.exp(-gamma))
    return math.sqrt(alpha2) * mu, alpha2 * s * s + sigma2


M0, V0 = _moments(GAMMA_MIN)
M1, V1 = _moments(GAMMA_MAX)
# z_0 when z_1 ~ N(0, 1) is pushed through the exact flow map: N(M0 - sqrt(V0/V1) M1, V0/V1).
FLOW_MEAN, FLOW_VAR = M0 - math.sqrt(V0 / V1) * M1, V0 / V1


def _log_normal(z, mean, var):
    return -0.5 * np.square(z - mean) / var - 0.5 * np.log(2 * np.pi * var)


# ------------------------------------------------------------------------------------------------
# The Gaussian model


@pytest.mark.slow
def test_same_key_same_samples_and_labels_per_example():
    shape = (4, 2, 2, 1)
    labels = jnp.arange(4)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    runs = {
        "ancestral": lambda k, d: sampling.ancestral_sample(
            GAUSS, NO_PARAMS, k, shape=shape, num_steps=10, labels=labels, decode=d,
            return_latent=True,
        ),
        "ddim": lambda k, d: sampling.ddim_sample(
            GAUSS, NO_PARAMS, k, shape=shape, num_steps=10, labels=labels, decode=d,
            return_latent=True,
        ),
        "ode": lambda k, d: ode.ode_sample(
            GAUSS, NO_PARAMS, k, shape=shape, labels=labels, rtol=1e-3, atol=1e-3, decode=d,
            return_latent=True,
        ),
    }  # fmt: skip
    for name, run in runs.items():
        images_a, z_a = run(k1, "sample")
        images_b, z_b = run(k1, "sample")
        _, z_c = run(k2, "sample")
        images_argmax, z_argmax = run(k1, "argmax")
        assert images_a.dtype == jnp.int32 and images_a.shape == shape, name
        np.testing.assert_array_equal(z_a, z_b, err_msg=name)
        np.testing.assert_array_equal(images_a, images_b, err_msg=name)
        np.testing.assert_array_equal(z_a, z_argmax, err_msg=name)  # decoding uses its own key
        assert not np.allclose(z_a, z_c), name
        # The decoder is sharp (sigma_0 ~ 1e-3 << bin width 2/256): argmax and sample agree but
        # for a neighbouring value now and then.
        assert np.max(np.abs(np.asarray(images_a) - np.asarray(images_argmax))) <= 1, name


@pytest.mark.slow
def test_jitted_and_unjitted_samplers_agree():
    kwargs = dict(shape=(3, 2, 2, 1), num_steps=4, return_latent=True)
    for sampler in (sampling.ancestral_sample, sampling.ddim_sample):
        images, z_0 = sampler(GAUSS, NO_PARAMS, jax.random.key(5), **kwargs)
        with jax.disable_jit():
            images_ref, z_0_ref = sampler(GAUSS, NO_PARAMS, jax.random.key(5), **kwargs)
        np.testing.assert_allclose(z_0, z_0_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(images, images_ref)


@pytest.mark.slow
def test_progress_bar_counts_every_step_and_changes_nothing():
    class Ticks(sampling.StepProgress):
        def __call__(self, j, total):
            ticks.append(int(j))
            super().__call__(j, total)

    ticks = []
    kwargs = dict(shape=(2, 2, 2, 1), num_steps=6, return_latent=True)
    for sampler in (sampling.ancestral_sample, sampling.ddim_sample, sampling.dpm_solver_sample):
        ticks.clear()
        bar = Ticks()
        _, z_quiet = sampler(GAUSS, NO_PARAMS, jax.random.key(3), **kwargs)
        _, z_shown = sampler(GAUSS, NO_PARAMS, jax.random.key(3), progress=bar, **kwargs)
        _, z_default_bar = sampler(GAUSS, NO_PARAMS, jax.random.key(3), progress=True, **kwargs)
        jax.effects_barrier()
        np.testing.assert_array_equal(z_quiet, z_shown)
        np.testing.assert_array_equal(z_quiet, z_default_bar)
        assert sorted(ticks) == list(range(6)), sampler
        assert not bar.is_open  # the bar was closed


@pytest.mark.slow
def test_ancestral_sampler_reproduces_the_data_distribution():
    # 64,000 independent values; T = 1000 as in the paper.
    _, z_0 = sampling.ancestral_sample(
        GAUSS, NO_PARAMS, jax.random.key(0), shape=(4000, 4, 4, 1), num_steps=1000,
        return_latent=True,
    )  # fmt: skip
    z_0 = np.asarray(z_0, np.float64)
    # Target q(z_0) = N(alpha_0 mu, alpha_0^2 s^2 + sigma_0^2). Standard errors: mean 0.002,
    # variance 0.0014 (0.6%).
    assert abs(z_0.mean() - M0) < 0.01
    assert abs(z_0.var() / V0 - 1.0) < 0.03


@pytest.mark.slow
def test_deterministic_samplers_follow_the_flow_map():
    shape = (4000, 4, 4, 1)
    _, z_ode = ode.ode_sample(GAUSS, NO_PARAMS, jax.random.key(0), shape=shape, return_latent=True)
    _, z_ddim = sampling.ddim_sample(
        GAUSS, NO_PARAMS, jax.random.key(0), shape=shape, num_steps=100, return_latent=True
    )
    z_ode, z_ddim = np.asarray(z_ode, np.float64), np.asarray(z_ddim, np.float64)
    # The ODE is exact: z_0 = FLOW_MEAN + sqrt(FLOW_VAR) z_1 in distribution.
    assert abs(z_ode.mean() - FLOW_MEAN) < 0.01
    assert abs(z_ode.var() / FLOW_VAR - 1.0) < 0.03
    # DDIM is its first-order discretisation: 100 steps lose about 4% of the variance.
    assert abs(z_ddim.mean() - FLOW_MEAN) < 0.015
    assert abs(z_ddim.var() / FLOW_VAR - 1.0) < 0.07
    # Same z_1 (same key), so the two samplers' outputs nearly coincide pointwise.
    assert np.sqrt(np.mean(np.square(z_ode - z_ddim))) < 0.05


def test_probability_flow_drift_is_f_z_minus_half_g2_score():
    """The drift against the textbook form with f and g^2 from autodiff of alpha_t, sigma_t."""
    z = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
    gamma_fn = GAUSS.bind(NO_PARAMS).gamma
    log_alpha = lambda t: 0.5 * jnp.log(jax.nn.sigmoid(-gamma_fn(t)))  # noqa: E731
    sigma2 = lambda t: jax.nn.sigmoid(gamma_fn(t))  # noqa: E731
    for t in (0.0, 0.01, 0.3, 0.7, 0.99, 1.0):
        t = jnp.float32(t)
        f = jax.grad(log_alpha)(t)
        g2 = jax.grad(sigma2)(t) - 2.0 * f * sigma2(t)
        eps_hat = GAUSS.apply(NO_PARAMS, z, gamma_fn(t), method="predict_noise")
        score = -eps_hat / jnp.sqrt(sigma2(t))
        expected = f * z - 0.5 * g2 * score
        got = jax.jit(ode.probability_flow_drift, static_argnums=0)(GAUSS, NO_PARAMS, z, t)
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_ode_log_prob_latent_matches_the_closed_form_density():
    batch, dims = 16, 4
    z_0 = M0 + math.sqrt(V0) * jax.random.normal(jax.random.key(0), (batch, 2, 2, 1))
    log_p, nfe = ode.ode_log_prob_latent(GAUSS, NO_PARAMS, z_0, jax.random.key(1))
    log_p, z = np.asarray(log_p, np.float64), np.asarray(z_0, np.float64).reshape(batch, dims)
    assert nfe.shape == (batch,) and nfe.dtype == jnp.int32 and np.all(nfe > 1)

    # Exactly the model's density: the N(0, I) prior at the flow image z_1, times the Jacobian.
    z_1 = M1 + math.sqrt(V1 / V0) * (z - M0)
    model_density = _log_normal(z_1, 0.0, 1.0).sum(1) + 0.5 * dims * math.log(V1 / V0)
    np.testing.assert_allclose(log_p, model_density, atol=1e-3)  # measured 2.5e-5 nats
    # And within a few percent of the data's marginal q(z_0) (the prior differs slightly
    # from q(z_1) = N(alpha_1 mu, v_1)).
    data_density = _log_normal(z, M0, V0).sum(1)
    assert np.mean(np.abs(log_p - data_density)) / np.mean(np.abs(data_density)) < 0.05

    # Gaussian probes are unbiased but noisy (sd about 2.5 nats here with one probe).
    z_0 = M0 + math.sqrt(V0) * jax.random.normal(jax.random.key(2), (64, 2, 2, 1))
    log_p, _ = ode.ode_log_prob_latent(
        GAUSS, NO_PARAMS, z_0, jax.random.key(3), hutchinson="gaussian", num_probes=8,
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    z = np.asarray(z_0, np.float64).reshape(64, dims)
    z_1 = M1 + math.sqrt(V1 / V0) * (z - M0)
    model_density = _log_normal(z_1, 0.0, 1.0).sum(1) + 0.5 * dims * math.log(V1 / V0)
    assert abs(np.mean(np.asarray(log_p) - model_density)) < 0.5


@pytest.mark.slow
def test_ode_log_likelihood_terms_of_the_gaussian_model():
    images = jax.random.randint(jax.random.key(0), (8, 2, 2, 1), 100, 160)
    result = ode.ode_log_likelihood(
        GAUSS, NO_PARAMS, images, jax.random.key(1), rtol=1e-4, atol=1e-4
    )
    dims = 4
    np.testing.assert_allclose(
        result.bpd,
        (result.reconstruction - result.log_p_latent + result.log_q_latent) / (dims * math.log(2)),
        rtol=1e-5,
    )
    # The decoder is sharp; E[log q(z_0|x)] = -D/2 (1 + log(2 pi sigma_0^2)) (sd 0.35 per dim).
    reconstruction = np.asarray(result.reconstruction)
    assert np.all(reconstruction >= 0) and np.mean(reconstruction) < 0.1
    log_sigma2_0 = math.log(1.0 / (1.0 + math.exp(-GAMMA_MIN)))
    expected_log_q = -0.5 * (1.0 + math.log(2 * math.pi) + log_sigma2_0)
    assert abs(np.mean(result.log_q_latent) / dims - expected_log_q) < 0.5
    assert np.all(np.isfinite(result.bpd)) and result.nfe.shape == (8,)


def test_invalid_settings_raise_value_error():
    with pytest.raises(ValueError, match="decode"):
        sampling.ancestral_sample(
            GAUSS, NO_PARAMS, jax.random.key(0), shape=(1, 1, 1, 1), num_steps=2, decode="mode"
        )
    with pytest.raises(ValueError, match="num_steps"):
        sampling.ddim_sample(GAUSS, NO_PARAMS, jax.random.key(0), shape=(1, 1, 1, 1), num_steps=0)
    with pytest.raises(ValueError, match="hutchinson"):
        ode.ode_log_prob_latent(
            GAUSS, NO_PARAMS, jnp.zeros((1, 1, 1, 1)), jax.random.key(0), hutchinson="normal"
        )
    with pytest.raises(ValueError, match="shape"):
        ode.ode_sample(GAUSS, NO_PARAMS, jax.random.key(0), shape=(1, 1, 1))


# ------------------------------------------------------------------------------------------------
# A tiny real VDM

TRACES = [0]


class CountingVDM(VDM):
    """The VDM, counting how often its score network is traced (Python runs only when tracing)."""

    def predict_noise(self, z, gamma_t, labels=None, **kwargs):
        TRACES[0] += 1
        return super().predict_noise(z, gamma_t, labels, **kwargs)


@pytest.fixture(scope="module")
def tiny_vdm():
    model = CountingVDM(score_net=ScoreUNet(n_layer=1, n_embd=16), vocab_size=17)
    images = jax.random.randint(jax.random.key(0), (4, 8, 8, 1), 0, 17).astype(jnp.uint8)
    init = jax.jit(lambda k: model.init({"params": k, "diffusion": k}, images, train=False))
    params = init(jax.random.key(1))
    # The output convolution starts at zero (eps_hat = z); give it a small non-zero value.
    conv_out = params["params"]["score_net"]["conv_out"]
    conv_out["kernel"] = 1e-4 * jax.random.normal(jax.random.key(2), conv_out["kernel"].shape)
    return model, params, images


@pytest.mark.slow
def test_tiny_vdm_samplers_run_without_retracing(tiny_vdm, capsys):
    model, params, images = tiny_vdm
    shape = (8, 8, 8, 1)
    runs = {
        "ancestral T=20": lambda k: sampling.ancestral_sample(
            model, params, k, shape=shape, num_steps=20
        ),
        "ddim T=10": lambda k: sampling.ddim_sample(
            model, params, k, shape=shape, num_steps=10, decode="sample"
        ),
        "ode tol=1e-3": lambda k: ode.ode_sample(
            model, params, k, shape=shape, rtol=1e-3, atol=1e-3
        ),
    }
    speeds = []
    for name, run in runs.items():
        first = jax.block_until_ready(run(jax.random.key(0)))
        traces = TRACES[0]
        start = time.perf_counter()
        second = jax.block_until_ready(run(jax.random.key(1)))
        speeds.append(f"{name}: {shape[0] / (time.perf_counter() - start):.0f} images/s")
        assert TRACES[0] == traces, f"{name} retraced on a new key"
        for out in (first, second):
            assert out.dtype == jnp.int32 and out.shape == shape, name
            assert 0 <= int(out.min()) and int(out.max()) <= 16, name
        assert not np.array_equal(first, second), name

    result = ode.ode_log_likelihood(model, params, images, jax.random.key(0), rtol=1e-3, atol=1e-3)
    traces = TRACES[0]
    again = ode.ode_log_likelihood(model, params, images, jax.random.key(1), rtol=1e-3, atol=1e-3)
    assert TRACES[0] == traces, "ode_log_likelihood retraced on a new key"
    for r in (result, again):
        assert r.bpd.shape == (4,) and r.bpd.dtype == jnp.float32
        assert np.all(np.isfinite(r.bpd)) and np.all(np.asarray(r.bpd) > 0)
        assert r.nfe.shape == (4,) and np.all(np.asarray(r.nfe) > 1)
    with capsys.disabled():
        print(
            f"\n[tiny VDM 8x8x1, {jax.default_backend()}] {'; '.join(speeds)}; "
            f"ODE bpd {np.asarray(result.bpd)}, NFE {np.asarray(result.nfe)}"
        )


class _GaussianEpsNet(nn.Module):
    """The Gaussian model's optimal eps_hat as a score network (``ScoreUNet`` signature)."""

    def __call__(self, z, gamma_t, labels=None, *, train=False):
        return GaussianModel.predict_noise(GAUSS, z, gamma_t)


class _AsV(nn.Module):
    """A network that outputs v_hat = v(eps_hat of the wrapped network): its v-twin."""

    net: nn.Module

    def __call__(self, z, gamma_t, labels=None, *, train=False):
        from vdm_jax.maths import diffusion

        return diffusion.v_from_eps(z, self.net(z, gamma_t, labels, train=train), gamma_t)


@pytest.mark.slow
def test_every_sampler_gives_the_same_samples_for_an_eps_model_and_its_v_twin():
    schedule = FixedLinearSchedule()
    eps_model = VDM(_GaussianEpsNet(), schedule, parameterization="eps")
    v_model = VDM(_AsV(_GaussianEpsNet()), schedule, parameterization="v")
    shape, key = (4, 2, 2, 1), jax.random.key(3)
    runs = {
        "ancestral": lambda m: sampling.ancestral_sample(
            m, NO_PARAMS, key, shape=shape, num_steps=20, return_latent=True),
        "ddim": lambda m: sampling.ddim_sample(
            m, NO_PARAMS, key, shape=shape, num_steps=20, return_latent=True),
        "ode": lambda m: ode.ode_sample(
            m, NO_PARAMS, key, shape=shape, rtol=1e-6, atol=1e-6, return_latent=True),
        "dpm": lambda m: sampling.dpm_solver_sample(
            m, NO_PARAMS, key, shape=shape, num_steps=10, return_latent=True),
        "dpm_sde": lambda m: sampling.dpm_solver_sample(
            m, NO_PARAMS, key, shape=shape, num_steps=10, stochastic=True, return_latent=True),
    }  # fmt: skip
    for name, run in runs.items():
        images_eps, z_eps = run(eps_model)
        images_v, z_v = run(v_model)
        # The fixed-step samplers agree to float32 rounding; the adaptive ODE solver may take
        # other steps on a rounding difference, so there they agree to its tolerance.
        tol = 2e-5 if name == "ode" else 2e-6
        np.testing.assert_allclose(z_v, z_eps, rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_array_equal(images_v, images_eps, err_msg=name)
    with pytest.raises(ValueError, match="parameterization must be one of"):
        VDM(_GaussianEpsNet(), schedule, parameterization="noise")


@pytest.mark.slow
def test_dpm_solver_error_falls_at_second_order_and_its_sde_variant_samples_the_data():
    shape, key = (256, 2, 2, 1), jax.random.key(4)
    z_1 = jax.random.normal(jax.random.split(key, 3)[0], shape)
    exact = M0 + math.sqrt(V0 / V1) * (np.asarray(z_1, np.float64) - M1)  # the flow map

    def rms(sampler, num_steps, **kwargs):
        _, z_0 = sampler(
            GAUSS, NO_PARAMS, key, shape=shape, num_steps=num_steps, return_latent=True, **kwargs
        )
        return float(np.sqrt(np.mean(np.square(np.asarray(z_0, np.float64) - exact))))

    dpm = [rms(sampling.dpm_solver_sample, n) for n in (8, 16, 32, 64, 128)]
    ddim = [rms(sampling.ddim_sample, n) for n in (64, 128)]
    ratios = [a / b for a, b in itertools.pairwise(dpm)]
    print(f"\nDPM-Solver++(2M) RMS errors at 8..128 steps {dpm}, ratios {ratios}; DDIM {ddim}")
    # Asymptotically 4 per halving of the step for a second-order method (2 for DDIM's first).
    assert all(3.5 < r < 4.5 for r in ratios[-2:]), ratios
    assert 1.7 < ddim[0] / ddim[1] < 2.3
    assert dpm[3] < 0.05 * ddim[0]
    # The stochastic variant samples q(z_0) = N(M0, V0), not the flow map.
    _, z_sde = sampling.dpm_solver_sample(
        GAUSS, NO_PARAMS, key, shape=(4000, 4, 4, 1), num_steps=200, stochastic=True,
        return_latent=True,
    )  # fmt: skip
    z_sde = np.asarray(z_sde, np.float64)
    assert abs(z_sde.mean() - M0) < 0.01 and abs(z_sde.var() / V0 - 1.0) < 0.03
