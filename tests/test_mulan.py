"""MuLAN: the per-pixel maths against closed forms, the schedule, the latent, the model, and
the import of checkpoints written by the authors' code against what their code computes."""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import pretrained
from vdm_jax.errors import UserError
from vdm_jax.maths import diffusion, losses
from vdm_jax.maths import mulan as mulan_maths
from vdm_jax.models import mulan

REPO = pathlib.Path(__file__).resolve().parent.parent
_IN_REPO = REPO / "tests" / "fixtures" / "mulan"
FIXTURES = _IN_REPO if _IN_REPO.is_dir() else REPO.parent / "shared" / "fixtures" / "mulan"
NAMES = ("topk_velocity", "gaussian_velocity")


def _fixture(name):
    root = FIXTURES / name
    if not (root / "expected.npz").exists():
        pytest.skip(f"no MuLAN fixture {name} under {FIXTURES}")
    return root


@functools.cache
def _loaded(name):
    root = _fixture(name)
    made_with = root / "made_with.json"
    latent_k = json.loads(made_with.read_text())["latent_k"] if made_with.exists() else 5
    model, variables = pretrained.load_mulan_checkpoint(root, params="ema", latent_k=latent_k)
    return model, variables, dict(np.load(root / "expected.npz"))


# ---------------------------------------------------------------------------------------------
# Import of the authors' checkpoints.


@pytest.mark.parametrize("name", NAMES)
def test_schedule_matches_theirs(name):
    model, variables, e = _loaded(name)
    c = jnp.asarray(e["embedding"])

    def both(t):
        return model.apply(variables, t, c, method=model.gamma_and_derivative)

    gamma, rate = jax.vmap(both)(jnp.asarray(e["t"]))
    assert gamma.shape == e["gamma_t"].shape
    np.testing.assert_allclose(gamma, e["gamma_t"], rtol=0, atol=1e-5)
    # Ours is the closed form, theirs jax.jvp of the polynomial: float32 rounding of rates
    # up to ~160 apart.
    scale = np.abs(e["dgamma_dt"]).max()
    np.testing.assert_allclose(rate, e["dgamma_dt"], rtol=0, atol=1e-5 * scale)
    plain = model.apply(variables, jnp.asarray(0.5), c, method=model.gamma)
    np.testing.assert_allclose(plain, e["gamma_t"][5], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_network_and_encoder_match_theirs(name):
    model, variables, e = _loaded(name)
    z, gamma = jnp.asarray(e["z"]), jnp.asarray(e["gamma_pixels"])
    c = jnp.asarray(e["embedding"])
    eps_hat = model.apply(variables, z, gamma, c, method=model.predict_noise)
    alpha, sigma = diffusion.alpha_sigma(gamma)
    theirs = alpha * e["net_out"] + sigma * z  # their README's conversion of v-hat
    np.testing.assert_allclose(eps_hat, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())
    v_hat = diffusion.v_from_eps(z, eps_hat, gamma)
    np.testing.assert_allclose(v_hat, e["net_out"], rtol=0, atol=1e-4 * np.abs(e["net_out"]).max())

    images = jnp.asarray(e["images"])
    out = model.apply(variables, images, method=model.encode)
    if model.latent_kind == "topk":
        np.testing.assert_allclose(out, e["encoder_logits"], rtol=0, atol=1e-5)
    else:
        np.testing.assert_allclose(out[0], e["encoder_mu"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(out[1], e["encoder_var"], rtol=0, atol=1e-5)
    mean_c = model.apply(variables, images, method=model.mean_latent)
    np.testing.assert_allclose(mean_c, e["embedding"], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bound_terms_match_theirs(name):
    """Per image and term, our mean over R draws is within 4 standard errors of theirs (their
    per-draw standard deviation over their 64 draws stands for both)."""
    model, variables, e = _loaded(name)
    images = jnp.asarray(e["images"])
    draws = 8

    @jax.jit
    def terms(key):
        out = model.apply(variables, images, train=False, rngs={"diffusion": key})
        return jnp.stack([out.latent + out.prior, out.reconstruction, out.diffusion])

    ours = np.asarray(jax.lax.map(terms, jax.random.split(jax.random.key(0), draws))).mean(0)
    theirs, std = e["vlb_terms_mean"], e["vlb_terms_std"]
    stderr = std * math.sqrt(1 / 64 + 1 / draws)
    # The latents' KL and the prior's are deterministic here: float32 rounding of their sums.
    np.testing.assert_array_less(np.abs(ours - theirs), 4 * stderr + 1e-5 * np.abs(theirs))


def test_loader_errors_name_the_path_and_field(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        pretrained.load_mulan_checkpoint(tmp_path / "absent")
    root = _fixture("topk_velocity")
    import flax.serialization

    state = flax.serialization.msgpack_restore(
        (root / "checkpoints-0" / "ckpt-1.flax").read_bytes()
    )
    del state["ema_params"]["encoder_model"]["dense_layer_final"]
    (tmp_path / "ckpt-1.flax").write_bytes(flax.serialization.msgpack_serialize(state))
    with pytest.raises(UserError, match=r"ckpt-1\.flax.*final layers"):
        pretrained.load_mulan_checkpoint(tmp_path)
    state = flax.serialization.msgpack_restore(
        (root / "checkpoints-0" / "ckpt-1.flax").read_bytes()
    )
    state["opt_state"] = {"0": state["opt_state"]["0"]}
    (tmp_path / "ckpt-1.flax").write_bytes(flax.serialization.msgpack_serialize(state))
    with pytest.raises(UserError, match="opt_state"):
        pretrained.load_mulan_checkpoint(tmp_path)
    with pytest.raises(UserError, match="params must be"):
        pretrained.load_mulan_checkpoint(root, params="last")


# ---------------------------------------------------------------------------------------------
# The schedule and the latent.


def _schedule(shape=(2, 3, 2), features=8, seed=0, latent=4, batch=3):
    sched = mulan_maths.PolynomialSchedule(image_shape=shape, n_features=features)
    c = jax.random.normal(jax.random.key(seed + 1), (batch, latent))
    params = sched.init(jax.random.key(seed), c, jnp.zeros(()))
    # Random a (theirs starts at zero) so that every coefficient matters.
    params = jax.tree.map(
        lambda p: p + 0.5 * jax.random.normal(jax.random.key(seed + 2), p.shape), params
    )
    return sched, params, c


@pytest.mark.slow
def test_schedule_rate_is_its_derivative_and_endpoints_are_fixed():
    sched, params, c = _schedule()
    t = jnp.array([0.0, 0.3, 0.9])
    gamma, rate = sched.apply(params, c, t, method=sched.gamma_and_derivative)
    assert gamma.shape == rate.shape == (3, 2, 3, 2)
    _, jvp = jax.jvp(lambda t: sched.apply(params, c, t), (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(rate, jvp, rtol=1e-5, atol=1e-5 * float(jnp.abs(jvp).max()))
    assert bool(jnp.all(rate >= 0))
    # gamma_min + (gamma_max - gamma_min) * 1 is 4.999999 in float32, theirs alike.
    np.testing.assert_array_equal(sched.apply(params, c, 0.0), jnp.full(gamma.shape, -13.3))
    np.testing.assert_allclose(sched.apply(params, c, 1.0), 5.0, rtol=0, atol=2e-6)
    grid = sched.apply(params, jnp.repeat(c[:1], 50, axis=0), jnp.linspace(0, 1, 50))
    assert bool(jnp.all(jnp.diff(grid, axis=0) >= -1e-5))


@pytest.mark.slow
def test_relaxed_topk_is_k_hot_with_a_soft_gradient():
    logits = jnp.array([[0.3, -1.0, 2.0, 0.5, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    c = mulan_maths.relaxed_topk(logits, 2)
    np.testing.assert_array_equal(c, [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    grad = jax.grad(lambda l: jnp.sum(mulan_maths.relaxed_topk(l, 2) * jnp.arange(5.0)))(logits)
    assert float(jnp.abs(grad).max()) > 0
    kl = mulan_maths.categorical_uniform_kl(jnp.zeros((2, 7)))
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    np.testing.assert_allclose(
        mulan_maths.categorical_uniform_kl(jnp.array([[50.0, 0, 0, 0]])), math.log(4), rtol=1e-5
    )
    noise = mulan_maths.topk_noise(jax.random.key(0), 3, (2000, 4))
    assert noise.shape == (2000, 4) and bool(jnp.all(jnp.isfinite(noise)))


def test_gaussian_kl_matches_float64_closed_form():
    mean = jnp.array([[0.5, -1.0], [0.0, 2.0]])
    var = jnp.array([[0.3, 1.0], [1.0, 0.1]])
    m, v = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    closed = 0.5 * np.sum(m**2 + v - np.log(v) - 1, axis=1)
    np.testing.assert_allclose(mulan_maths.gaussian_kl(mean, var), closed, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The per-pixel maths.


def _same(actual, desired):
    np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_multivariate_functions_reduce_to_the_univariate_ones():
    """A field of equal gammas gives the univariate results to float32 rounding (XLA fuses
    the broadcast [B, 1, 1, 1] and the full field differently, so not always to the bit)."""
    key = jax.random.split(jax.random.key(0), 4)
    x_int = jax.random.randint(key[0], (3, 4, 4, 2), 0, 256)
    x = diffusion.encode(x_int, 256)
    eps = jax.random.normal(key[1], x.shape)
    eps_hat = eps + 0.1 * jax.random.normal(key[2], x.shape)
    g_s, g_t = jnp.array([-8.0, -2.0, 1.0]), jnp.array([-7.5, 0.5, 4.0])
    rate = jnp.array([3.0, 18.3, 40.0])

    def field(g):
        return jnp.broadcast_to(g[:, None, None, None], x.shape)

    z = diffusion.q_sample(x, g_t, eps)
    _same(diffusion.q_sample(x, field(g_t), eps), z)
    for fn in (diffusion.predict_x, diffusion.eps_from_v):
        _same(fn(z, eps, field(g_t)), fn(z, eps, g_t))
    mean_u, var_u = diffusion.posterior(z, x, g_s, g_t)
    mean_m, var_m = diffusion.posterior(z, x, field(g_s), field(g_t))
    _same(mean_m, mean_u)
    _same(var_m, jnp.broadcast_to(var_u, x.shape))
    _same(
        diffusion.ancestral_step(z, eps_hat, field(g_s), field(g_t), eps),
        diffusion.ancestral_step(z, eps_hat, g_s, g_t, eps),
    )
    _same(losses.prior_kl(x, field(g_t)), losses.prior_kl(x, g_t))
    z_0 = diffusion.q_sample(x, g_s, eps)
    _same(
        losses.reconstruction_nll(x_int, z_0, field(g_s), 256),
        losses.reconstruction_nll(x_int, z_0, g_s, 256),
    )
    # The sum's order differs (rate inside it): float32 rounding.
    np.testing.assert_allclose(
        losses.diffusion_loss_continuous(eps, eps_hat, field(rate)),
        losses.diffusion_loss_continuous(eps, eps_hat, rate),
        rtol=1e-6,
    )
    v = diffusion.from_eps(eps, z, g_t, "v")
    v_hat = diffusion.from_eps(eps_hat, z, g_t, "v")
    np.testing.assert_allclose(
        losses.diffusion_loss_continuous_v(v, v_hat, field(g_t), field(rate)),
        losses.diffusion_loss_continuous(eps, eps_hat, rate),
        rtol=1e-5,
    )


def test_per_pixel_prior_kl_and_posterior_match_float64_closed_forms():
    key = jax.random.split(jax.random.key(1), 3)
    x = jax.random.uniform(key[0], (2, 3, 3, 1), minval=-1, maxval=1)
    g_t = jax.random.uniform(key[1], x.shape, minval=-13.3, maxval=5.0)
    g_s = g_t - jax.random.uniform(key[2], x.shape, minval=1e-3, maxval=3.0)
    xd, gt, gs = (np.asarray(a, np.float64) for a in (x, g_t, g_s))
    a2 = 1 / (1 + np.exp(gt))
    s2 = 1 - a2
    closed = 0.5 * np.sum(s2 + a2 * xd**2 - 1 - np.log(s2), axis=(1, 2, 3))
    np.testing.assert_allclose(losses.prior_kl(x, g_t), closed, rtol=1e-5)

    z = jnp.asarray(np.sqrt(a2) * xd + np.sqrt(s2) * 0.3, jnp.float32)
    a2s = 1 / (1 + np.exp(gs))
    s2s = 1 - a2s
    a_ts2 = a2 / a2s
    s_ts2 = s2 - a_ts2 * s2s
    mean_closed = (
        np.sqrt(a_ts2) * s2s / s2 * np.asarray(z, np.float64) + np.sqrt(a2s) * s_ts2 / s2 * xd
    )
    mean, var = diffusion.posterior(z, x, g_s, g_t)
    np.testing.assert_allclose(mean, mean_closed, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(var, s_ts2 * s2s / s2, rtol=1e-4)


@pytest.mark.slow
def test_per_pixel_diffusion_loss_with_the_optimal_denoiser_matches_closed_form():
    """x_i ~ N(0, v_i) independent, each pixel with its own polynomial schedule: with the
    optimal denoiser E[eps|z] the expected loss is sum_i 1/2 (softplus(log v_i - gamma_min)
    - softplus(log v_i - gamma_max)), whatever the schedules' shapes; the v form agrees."""
    shape = (2, 2, 1)
    variances = jnp.array([0.25, 1.0, 0.04, 2.0]).reshape(shape)
    n = 100_000
    sched, params, _ = _schedule(shape=shape, features=8, seed=5, latent=3, batch=1)
    k_c, k_t, k_x, k_e = jax.random.split(jax.random.key(7), 4)
    c = jax.random.normal(k_c, (n, 3))
    t = jax.random.uniform(k_t, (n,))
    gamma, rate = sched.apply(params, c, t, method=sched.gamma_and_derivative)
    spread = gamma.reshape(n, -1).std(axis=1)
    assert float(jnp.median(spread)) > 0.1  # the pixels' schedules differ
    x = jnp.sqrt(variances) * jax.random.normal(k_x, (n, *shape))
    eps = jax.random.normal(k_e, x.shape)
    z = diffusion.q_sample(x, gamma, eps)
    alpha, sigma = diffusion.alpha_sigma(gamma)
    eps_hat = sigma * z / (alpha**2 * variances + sigma**2)
    loss = losses.diffusion_loss_continuous(eps, eps_hat, rate)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    closed = sum(
        0.5 * (softplus(math.log(v) + 13.3) - softplus(math.log(v) - 5.0))
        for v in np.asarray(variances).ravel()
    )
    stderr = float(jnp.std(loss)) / math.sqrt(n)
    assert abs(float(jnp.mean(loss)) - closed) < 4 * stderr
    v = diffusion.from_eps(eps, z, gamma, "v")
    v_hat = diffusion.from_eps(eps_hat, z, gamma, "v")
    np.testing.assert_allclose(
        losses.diffusion_loss_continuous_v(v, v_hat, gamma, rate), loss, rtol=1e-4, atol=1e-4
    )


# ---------------------------------------------------------------------------------------------
# The model on its own.


def _tiny_model(kind):
    shape = (4, 4, 1)
    common = dict(norm_groups=4, dropout_rate=0.1)
    return mulan.MuLAN(
        score_net=mulan.LatentConditionedUNet(n_layer=1, n_embd=8, latent_size=6, **common),
        schedule=mulan_maths.PolynomialSchedule(image_shape=shape, n_features=8),
        encoder=mulan.LatentEncoder(latent_size=6, kind=kind, n_layer=1, n_embd=8, **common),
        latent_k=2,
        parameterization="v",
        vocab_size=16,
    )


# Each piece jitted whole: run op by op, the model compiles hundreds of small programs (topk's
# jax.random.gamma sampler among them), minutes on a loaded 2-core machine.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["topk", "gaussian"])
def test_tiny_model_bound_gradients_and_samplers(kind):
    model = _tiny_model(kind)
    images = jax.random.randint(jax.random.key(0), (4, 4, 4, 1), 0, 16).astype(jnp.uint8)
    keys = {"params": jax.random.key(1), "diffusion": jax.random.key(2)}
    variables = jax.jit(lambda keys: model.init(keys, images, train=False))(keys)

    def loss(params):
        terms = model.apply(
            {"params": params},
            images,
            train=True,
            rngs={"diffusion": jax.random.key(3), "dropout": jax.random.key(4)},
        )
        return jnp.mean(terms.bpd), terms

    (value, terms), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert all(t.shape == (4,) for t in terms)
    assert bool(jnp.isfinite(value))
    head = "dense_layer_final" if kind == "topk" else "dense_layer_final_mu"
    assert float(jnp.abs(grads["encoder"][head]["bias"]).max()) > 0  # through c
    assert float(jnp.abs(grads["schedule"]["dense_out_b"]["kernel"]).max()) > 0
    for sampler, latent in (
        (mulan.ancestral_sample, "prior"),
        (mulan.ddim_sample, "deterministic"),
    ):
        draw = jax.jit(
            lambda v, k, sampler=sampler, latent=latent: sampler(
                model, v, k, (2, 4, 4, 1), 2, latent=latent
            )
        )
        out = draw(variables, jax.random.key(5))
        assert out.shape == (2, 4, 4, 1) and out.dtype == jnp.uint8
        assert int(out.max()) < 16
    c = model.apply(variables, 3, method=model.prior_latent)
    assert c.shape == (3, 6)
    if kind == "topk":
        np.testing.assert_array_equal(c.sum(axis=1), 2)
        drawn = jax.jit(lambda v, k: model.apply(v, k, 5, method=model.sample_prior_latent))(
            variables, jax.random.key(0)
        )
        np.testing.assert_array_equal(drawn.sum(axis=1), 2)


@pytest.mark.slow
def test_likelihood_estimators_count_the_latent_kl():
    """vlb and dense_vlb of a MuLAN are its whole bound, the latent's KL included: the same
    per-example figure as the model's own bound with the example's key."""
    from vdm_jax.models import evaluation, likelihood

    model = _tiny_model("gaussian")
    images = jax.random.randint(jax.random.key(0), (3, 4, 4, 1), 0, 16).astype(jnp.uint8)
    keys = {"params": jax.random.key(1), "diffusion": jax.random.key(2)}
    variables = jax.jit(lambda keys: model.init(keys, images, train=False))(keys)
    key, indices = jax.random.key(7), jnp.arange(3)
    estimate = likelihood.vlb(model, variables, {"image": images}, key, indices=indices)
    bound = jax.jit(functools.partial(evaluation.bound_terms, model))
    own = [
        bound(variables, {"image": images[i : i + 1]}, k)
        for i, k in enumerate(likelihood.example_keys(key, indices))
    ]
    np.testing.assert_allclose(estimate.bpd, [float(t.bpd[0]) for t in own], rtol=1e-5)
    latent = np.asarray(estimate.terms["latent"])
    assert latent.min() > 0
    np.testing.assert_allclose(latent, [float(t.latent[0]) for t in own], rtol=1e-5)
    dense = likelihood.dense_vlb(model, variables, {"image": images}, key, num_draws=2)
    total = sum(dense.terms[k] for k in ("latent", "prior", "reconstruction", "diffusion"))
    np.testing.assert_allclose(dense.nats, total, rtol=1e-5)
