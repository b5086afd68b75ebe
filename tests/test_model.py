"""The VDM module's bound and the exact-pass evaluation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vdm_jax as vdm
from vdm_jax.errors import UserError
from vdm_jax.models.evaluation import BpdAccumulator, evaluate_bpd
from vdm_jax.models.vdm import VDM, make_schedule

VOCAB = 17


def _tiny(**kwargs):
    net = vdm.ScoreUNet(
        n_layer=1, n_embd=16, dropout_rate=0.0, num_classes=kwargs.pop("num_classes", 0)
    )
    return VDM(score_net=net, vocab_size=VOCAB, **kwargs)


def _images(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (n, 8, 8, 1)), jnp.uint8)


def _rngs(seed):
    return {"diffusion": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}


@pytest.mark.slow
def test_terms_add_up_and_match_the_core_functions():
    model = _tiny()
    x_int = _images(4)
    params = model.init({"params": jax.random.key(0), **_rngs(1)}, x_int, train=False)
    terms = model.apply(params, x_int, train=False, rngs=_rngs(2))
    assert all(v.shape == (4,) and v.dtype == jnp.float32 for v in terms)
    total = terms.prior + terms.reconstruction + terms.diffusion
    np.testing.assert_allclose(terms.bpd, total / (64 * math.log(2)), rtol=1e-6)
    gamma_0, gamma_1 = model.apply(params, method=model.endpoints)
    np.testing.assert_allclose([gamma_0, gamma_1], [-13.3, 5.0], atol=2e-6)
    np.testing.assert_allclose(terms.prior, vdm.prior_kl(vdm.encode(x_int, VOCAB), gamma_1))
    # At initialisation eps_hat = z_t, so the diffusion term is a closed form of (t, eps).
    assert np.all(np.asarray(terms.diffusion) > 0)


@pytest.mark.slow
def test_discrete_time_and_continuous_time_and_bad_arguments():
    model = _tiny()
    x_int = _images(8)
    params = model.init({"params": jax.random.key(0), **_rngs(1)}, x_int, train=False)
    cont = model.apply(params, x_int, train=False, rngs=_rngs(3))
    disc = model.apply(params, x_int, train=False, num_steps=1000, rngs=_rngs(3))
    # Same times up to the 1/1000 grid, same noise: the two estimates are close.
    np.testing.assert_allclose(disc.diffusion, cont.diffusion, rtol=0.05)
    with pytest.raises(ValueError, match="num_steps=10"):
        _tiny(variance_gradient=True, num_steps=10)
    with pytest.raises(ValueError, match="vocab_size must be at least 2, got 1"):
        VDM(vocab_size=1)
    with pytest.raises(ValueError, match=r"images must be integers \[B, H, W, C\].*float32"):
        model.apply(params, jnp.zeros((2, 8, 8, 1)), train=False, rngs=_rngs(0))
    with pytest.raises(ValueError, match="unknown noise schedule 'cosine'"):
        make_schedule("cosine")


@pytest.mark.slow
def test_class_labels_reach_the_network():
    model = _tiny(num_classes=3)
    x_int = _images(4)
    labels = jnp.array([0, 1, 2, 3])
    params = model.init({"params": jax.random.key(0), **_rngs(1)}, x_int, labels, train=False)
    # Make the zero-initialised output layer non-zero so labels can change eps_hat.
    params = jax.tree.map(
        lambda p: p + 0.05 * jnp.sign(jnp.sin(jnp.arange(p.size))).reshape(p.shape), params
    )
    a = model.apply(params, x_int, labels, train=False, rngs=_rngs(2))
    b = model.apply(params, x_int, jnp.full((4,), 3), train=False, rngs=_rngs(2))
    assert not np.allclose(a.diffusion[:3], b.diffusion[:3])
    np.testing.assert_allclose(a.diffusion[3], b.diffusion[3], rtol=1e-6)


@pytest.mark.slow
def test_a_hundred_steps_of_training_lower_the_bound():
    # 100 steps lower the bound by about 2 bits/dim (10.73 to 8.72), twice the margin checked.
    model = _tiny(schedule=make_schedule("learned_linear"))
    x_int = _images(16)
    params = model.init({"params": jax.random.key(0), **_rngs(1)}, x_int, train=False)
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, i):
        def loss(p):
            return jnp.mean(
                model.apply(
                    p,
                    x_int,
                    train=True,
                    rngs=_rngs(0) | {"diffusion": jax.random.fold_in(jax.random.key(5), i)},
                ).bpd
            )

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def eval_bpd(p):
        batches = [{"image": x_int}] * 8
        return evaluate_bpd(model, p, batches, jax.random.key(7)).bpd

    before = eval_bpd(params)
    for i in range(100):
        params, opt_state, _ = step(params, opt_state, i)
    after = eval_bpd(params)
    print(f"tiny VDM on a fixed batch of 16 digits-like images: {before:.3f} -> {after:.3f} bpd")
    assert after < before - 1.0


@pytest.mark.slow
def test_evaluate_bpd_counts_an_uneven_number_of_examples_once():
    model = _tiny()
    x_int = _images(11, seed=3)
    params = model.init({"params": jax.random.key(0), **_rngs(1)}, x_int[:4], train=False)
    batches = [{"image": x_int[i : i + 4]} for i in range(0, 11, 4)]  # 4, 4, 3
    result = evaluate_bpd(model, params, batches, jax.random.key(2))
    assert result.num_examples == 11
    # The same numbers from the per-example terms directly.
    per_example = np.concatenate(
        [
            np.asarray(
                model.apply(
                    params,
                    jnp.asarray(
                        np.concatenate(
                            [b["image"], np.zeros((4 - len(b["image"]), 8, 8, 1), np.uint8)]
                        )
                    ),
                    train=False,
                    rngs={"diffusion": jax.random.fold_in(jax.random.key(2), i)},
                ).bpd
            )[: len(b["image"])]
            for i, b in enumerate(batches)
        ]
    )
    np.testing.assert_allclose(result.bpd, per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        result.bpd_stderr, per_example.std(ddof=1) / math.sqrt(11), rtol=1e-4
    )
    total = result.prior_bpd + result.reconstruction_bpd + result.diffusion_bpd
    np.testing.assert_allclose(total, result.bpd, rtol=1e-5)


def test_accumulator_rejects_empty_and_mismatched_masks():
    acc = BpdAccumulator()
    with pytest.raises(ValueError, match="no examples were evaluated"):
        acc.result(64)
    terms = vdm.VLBTerms(*(np.ones(3),) * 4)
    with pytest.raises(ValueError, match=r"mask has shape \(2,\), the batch \(3,\)"):
        acc.add(terms, np.ones(2, bool))


@pytest.mark.slow
@pytest.mark.parametrize("vocab_size", [256, 17])
def test_windowed_reconstruction_equals_the_full_decoder(vocab_size, optimized):
    from vdm_jax.maths import diffusion, losses
    from vdm_jax.maths.losses import window_gamma_limit, windowed_reconstruction_nll

    limit = window_gamma_limit(vocab_size, window=4)
    x_int = jax.random.randint(jax.random.key(0), (4, 6, 6, 3), 0, vocab_size)
    eps = jax.random.normal(jax.random.key(1), x_int.shape)
    x = diffusion.encode(x_int, vocab_size)

    # Below the limit (windowed), either side of it, and far above it (full softmax); with
    # noise up to 30 sigma_0 some z_0 land outside the window of x (the tail branch).
    def terms(fn, g, scale):
        return fn(x_int, diffusion.q_sample(x, g, scale * eps), g, vocab_size)

    def total(fn):
        return jax.jit(jax.value_and_grad(lambda g, scale: jnp.sum(terms(fn, g, scale))))

    windowed = functools.partial(windowed_reconstruction_nll, window=4)
    custom = functools.partial(windowed, custom_gradient=True)
    custom_total, plain_total = total(custom), total(windowed)
    theirs_total = total(losses.reconstruction_nll)
    for gamma_0 in (-13.3, limit - 1e-3, limit + 1e-3, -2.0):
        for scale in (1.0, 30.0):
            g = jnp.float32(gamma_0)
            ours = terms(windowed, g, scale)
            theirs = terms(losses.reconstruction_nll, g, scale)
            assert ours.shape == (4,) and ours.dtype == jnp.float32
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-4)
            v2, d2 = theirs_total(g, scale)
            for v1, d1 in (custom_total(g, scale), plain_total(g, scale)):
                np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=4e-4)
                np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_the_reconstruction_window_field_gives_the_same_bound_and_gradient():
    x_int = _images(4)
    plain, windowed = _tiny(), _tiny(reconstruction_window=4)
    params = plain.init({"params": jax.random.key(0), **_rngs(1)}, x_int, train=False)
    for model, conditional in ((plain, False), (windowed, True)):  # the default: no lax.cond
        jaxpr = jax.make_jaxpr(lambda p, m=model: m.apply(p, x_int, train=False, rngs=_rngs(2)))
        assert ("cond[" in str(jaxpr(params))) == conditional

    def bound_and_grad(model):
        def f(p):
            return jnp.mean(model.apply(p, x_int, train=True, rngs=_rngs(2)).bpd)

        return jax.jit(jax.value_and_grad(f))(params)

    for a, b in zip(jax.tree.leaves(bound_and_grad(windowed)),
                    jax.tree.leaves(bound_and_grad(plain)), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match=r"reconstruction_window must be >= 0 .*got -1"):
        _tiny(reconstruction_window=-1)


def test_configs_choose_the_formulation_fields():
    from vdm_jax.configs import base, digits
    from vdm_jax.training.builders import model_from_config

    plain = model_from_config(base.get_config(), 256)
    assert (plain.score_net.attention, plain.score_net.batch_pieces, plain.score_net.remat) == (
        "dot_product", 1, False,
    )  # fmt: skip
    assert plain.reconstruction_window == 0
    config = digits.get_config()
    config.model.remat = True
    fast = model_from_config(config, 17)
    assert (fast.score_net.attention, fast.score_net.batch_pieces, fast.score_net.remat) == (
        "chunked", 2, True,
    )  # fmt: skip
    assert fast.reconstruction_window == 4
