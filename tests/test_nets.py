"""Tests for vdm_jax.models.unet: the ScoreUNet noise-prediction network and its building blocks.

Everything runs on tiny models (n_layer=1, n_embd=16) except the paper-size parameter count,
which only traces shapes with ``jax.eval_shape``.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.models.embeddings import base2_fourier_features, timestep_embedding
from vdm_jax.models.unet import ScoreUNet, largest_group_count

TINY = {"n_layer": 1, "n_embd": 16, "dropout_rate": 0.1}


def _inputs(batch=2, size=8, channels=1, seed=0):
    """Random z [B, size, size, channels] and distinct gammas [B] in the schedule's range."""
    z = jax.random.normal(jax.random.key(seed), (batch, size, size, channels), jnp.float32)
    gamma = jnp.linspace(-10.0, 4.0, batch, dtype=jnp.float32)
    return z, gamma


def _init(model, z, gamma, labels=None, seed=0):
    return model.init(jax.random.key(seed), z, gamma, labels, train=False)["params"]


def _perturb(params, seed=1, scale=0.1):
    """Add Gaussian noise to every parameter, so the zero-initialised layers become active.

    Uses numpy's generator: no XLA compilation per parameter shape.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, inputs z [2, 8, 8, 1] and gamma [2], and perturbed parameters."""
    model = ScoreUNet(**TINY)
    z, gamma = _inputs()
    return model, z, gamma, _perturb(_init(model, z, gamma))


def _count(params):
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def test_paper_parameter_count():
    model = ScoreUNet(
        n_layer=32,
        n_embd=128,
        with_fourier_features=True,
        attention_everywhere=False,
    )
    z = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    gamma = jax.ShapeDtypeStruct((1,), jnp.float32)
    shapes = jax.eval_shape(lambda z, g: model.init(jax.random.key(0), z, g, train=False), z, gamma)
    assert _count(shapes["params"]) == 30_577_667
    assert {p.dtype for p in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
@pytest.mark.parametrize(("size", "channels"), [(8, 1), (32, 3)])
def test_shapes_dtypes_and_identity_at_init(size, channels):
    model = ScoreUNet(**TINY)
    z, gamma = _inputs(batch=2, size=size, channels=channels)
    params = _init(model, z, gamma)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    eps_hat = model.apply({"params": params}, z, gamma, train=False)
    assert eps_hat.shape == z.shape
    assert eps_hat.dtype == jnp.float32
    # The output convolution is zero-initialised, so eps_hat = z + 0 exactly.
    np.testing.assert_array_equal(np.asarray(eps_hat), np.asarray(z))


def test_non_square_input_shape():
    model = ScoreUNet(**TINY)
    z = jnp.ones((1, 8, 16, 3))
    shapes = jax.eval_shape(
        lambda: model.apply({"params": _init(model, z, 0.0)}, z, 0.0, train=False)
    )
    assert shapes.shape == (1, 8, 16, 3) and shapes.dtype == jnp.float32


def test_gamma_conditioning_changes_output(tiny):
    model, z, _, params = tiny
    out_a = model.apply({"params": params}, z, jnp.array([-5.0, -5.0]), train=False)
    out_b = model.apply({"params": params}, z, jnp.array([-5.0, 2.0]), train=False)
    np.testing.assert_allclose(out_a[0], out_b[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out_a[1], out_b[1], atol=1e-3)
    # A scalar gamma means the same value for every example.
    out_scalar = model.apply({"params": params}, z, -5.0, train=False)
    np.testing.assert_allclose(out_scalar, out_a, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_class_labels_and_unconditional_label():
    num_classes = 10
    model = ScoreUNet(**TINY, num_classes=num_classes)
    z, gamma = _inputs(batch=3)
    params = _init(model, z, gamma, jnp.zeros((3,), jnp.int32))
    assert params["label_embed"]["embedding"].shape == (num_classes + 1, TINY["n_embd"])
    params = _perturb(params)

    def apply(labels):
        return model.apply({"params": params}, z, gamma, labels, train=False)

    out_a = apply(jnp.array([0, 1, 2]))
    out_b = apply(jnp.array([0, 1, 7]))
    # Only the example whose label changed changes.
    np.testing.assert_allclose(out_a[:2], out_b[:2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out_a[2], out_b[2], atol=1e-3)

    # labels=None means the "unconditional" label num_classes for every example.
    uncond = apply(jnp.full((3,), num_classes))
    np.testing.assert_allclose(apply(None), uncond, rtol=1e-5, atol=1e-5)
    assert not np.allclose(uncond, out_a, atol=1e-3)
    assert np.all(np.isfinite(uncond))
    # A scalar label is broadcast to the batch.
    np.testing.assert_allclose(apply(jnp.int32(num_classes)), uncond, rtol=1e-5, atol=1e-5)


def test_dropout_uses_rng_only_in_training():
    model = ScoreUNet(**{**TINY, "dropout_rate": 0.5})
    z, gamma = _inputs()
    params = _perturb(_init(model, z, gamma))

    def apply(key, train):
        return model.apply({"params": params}, z, gamma, train=train, rngs={"dropout": key})

    train_a = apply(jax.random.key(1), True)
    train_b = apply(jax.random.key(2), True)
    assert not np.allclose(train_a, train_b, atol=1e-3)
    np.testing.assert_array_equal(train_a, apply(jax.random.key(1), True))
    # Evaluation needs no rng and is deterministic.
    eval_a = model.apply({"params": params}, z, gamma, train=False)
    np.testing.assert_array_equal(eval_a, apply(jax.random.key(3), False))
    assert not np.allclose(eval_a, train_a, atol=1e-3)
    with pytest.raises(Exception, match="dropout"):
        model.apply({"params": params}, z, gamma, train=True)


def test_jit_matches_eager_without_retracing(tiny):
    model, z, gamma, params = tiny

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(p, z, g):
        return model.apply({"params": p}, z, g, train=False)

    eager = model.apply({"params": params}, z, gamma, train=False)
    np.testing.assert_allclose(apply(params, z, gamma), eager, rtol=1e-5, atol=1e-5)
    apply(params, z + 1.0, gamma - 1.0)  # same shapes: no second trace


@pytest.mark.slow
def test_bfloat16_computation_keeps_float32_params_and_output(tiny):
    model32, z, gamma, params = tiny
    model16 = ScoreUNet(**TINY, dtype=jnp.bfloat16)
    shapes16 = jax.eval_shape(lambda: _init(model16, z, gamma))
    assert jax.tree.structure(shapes16) == jax.tree.structure(params)
    assert {p.dtype for p in jax.tree.leaves(shapes16)} == {jnp.dtype(jnp.float32)}

    out32 = model32.apply({"params": params}, z, gamma, train=False)
    out16 = jax.jit(lambda p: model16.apply({"params": p}, z, gamma, train=False))(params)
    assert out16.dtype == jnp.float32
    f32, f16 = out32 - z, out16 - z  # compare the network part, not the identity
    err = float(jnp.max(jnp.abs(f16 - f32)))
    assert err <= 0.05 * float(jnp.max(jnp.abs(f32))), err


@pytest.mark.slow
def test_attention_everywhere_and_small_channel_counts():
    # n_embd=8 (GroupNorm reduced to 2 groups at 8 channels and 4 at the 16-channel concat).
    model = ScoreUNet(n_layer=1, n_embd=8, dropout_rate=0.0, attention_everywhere=True)
    z, gamma = _inputs(size=8, channels=1)
    shapes = jax.eval_shape(lambda: _init(model, z, gamma))
    assert {"down_attn_0", "up_attn_0", "up_attn_1", "mid_attn"} <= set(shapes)
    assert shapes["conv_in"]["kernel"].shape == (3, 3, 1 + 2 * 2, 8)
    plain = ScoreUNet(n_layer=1, n_embd=8, with_fourier_features=False)
    plain_shapes = jax.eval_shape(lambda: _init(plain, z, gamma))
    assert "down_attn_0" not in plain_shapes
    # Without Fourier features the input conv sees only the C channels of z.
    assert plain_shapes["conv_in"]["kernel"].shape == (3, 3, 1, 8)

    params = _perturb(jax.jit(_init, static_argnums=0)(model, z, gamma))
    out = jax.jit(lambda p: model.apply({"params": p}, z, gamma, train=False))(params)
    assert out.shape == z.shape and bool(jnp.all(jnp.isfinite(out)))
    assert not np.allclose(out, z, atol=1e-3)


def test_input_validation_names_the_value():
    model = ScoreUNet(**TINY)
    z, gamma = _inputs()
    with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
        _init(model, z[..., 0], gamma)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        _init(model, z, jnp.zeros((3,)))
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        _init(model, z, jnp.zeros((2, 1)))
    with pytest.raises(ValueError, match="num_classes=0"):
        _init(model, z, gamma, jnp.array([1, 2]))
    conditional = ScoreUNet(**TINY, num_classes=3)
    with pytest.raises(ValueError, match="float32"):
        _init(conditional, z, gamma, jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        _init(conditional, z, gamma, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="-1"):
        ScoreUNet(n_layer=-1)
    with pytest.raises(ValueError, match=r"gamma_min=5\.0"):
        ScoreUNet(gamma_min=5.0, gamma_max=-13.3)
    with pytest.raises(ValueError, match=r"1\.5"):
        ScoreUNet(dropout_rate=1.5)


def test_largest_group_count():
    assert largest_group_count(128, 32) == 32
    assert largest_group_count(256, 32) == 32
    # At least 4 channels per group when possible (one channel per group would be instance
    # norm, which erases the per-channel conditioning shift).
    assert largest_group_count(32, 32) == 8
    assert largest_group_count(16, 32) == 4
    assert largest_group_count(8, 32) == 2
    assert largest_group_count(48, 32) == 12
    assert largest_group_count(3, 32) == 1
    assert largest_group_count(12, 32, min_group_size=1) == 12
    assert largest_group_count(7, 4, min_group_size=1) == 1
    with pytest.raises(ValueError, match="channels=0"):
        largest_group_count(0, 32)


def test_fourier_features_and_timestep_embedding():
    z = jnp.array([[0.1, -0.3]], jnp.float32)  # [1, C=2]
    feats = base2_fourier_features(z, (6, 7))
    assert feats.shape == (1, 8) and feats.dtype == jnp.float32
    phases = np.array([0.1 * 2**6, 0.1 * 2**7, -0.3 * 2**6, -0.3 * 2**7]) * 2 * np.pi
    expected = np.concatenate([np.sin(phases), np.cos(phases)])
    np.testing.assert_allclose(feats[0], expected, atol=1e-4)

    t = jnp.array([0.0, 0.5, 1.0])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (3, 16) and emb.dtype == jnp.float32
    np.testing.assert_allclose(emb[0], np.r_[np.zeros(8), np.ones(8)])  # sin(0), cos(0)
    np.testing.assert_allclose(emb[1, 0], np.sin(500.0), rtol=1e-4)  # scaled by 1000
    assert timestep_embedding(t, 7).shape == (3, 7)
    with pytest.raises(ValueError, match=r"\(3, 1\)"):
        timestep_embedding(t[:, None], 16)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "dtype", "custom_gradient"),
    [("chunked", jnp.float32, True), ("chunked", jnp.bfloat16, True),
     ("chunked", jnp.float32, False), ("dot_product", jnp.float32, False),
     ("dot_product", jnp.bfloat16, False)],
)  # fmt: skip
def test_dot_product_attention_matches_the_formula(kind, dtype, custom_gradient):
    from vdm_jax.models import attention

    # L = 1024 positions: the [L, L] logits of one example fill the chunk budget, so the
    # chunked formulation runs the 3 examples as a loop of 3 chunks.
    batch, length, channels = 3, 1024, 8
    q, k, v, g = (
        jax.random.normal(jax.random.key(i), (batch, length, channels)).astype(dtype)
        for i in range(4)
    )

    def reference(q, k, v):
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits / math.sqrt(channels), axis=-1)
        return jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v)

    def ours(q, k, v):
        return attention.dot_product_attention(q, k, v, kind=kind, custom_gradient=custom_gradient)

    def output_and_grads(fn):  # the output and the pullback of g
        def run(q, k, v):
            out, pullback = jax.vjp(fn, q, k, v)
            return out, pullback(g)

        return jax.jit(run)

    run = output_and_grads(ours)
    assert ("while" in run.lower(q, k, v).as_text()) == (kind == "chunked")
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    expected = jax.tree.leaves(output_and_grads(reference)(q, k, v))
    for a, b in zip(jax.tree.leaves(run(q, k, v)), expected, strict=True):
        assert a.dtype == b.dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.max(np.abs(b)))
    if not custom_gradient and dtype == jnp.float32:  # forward mode (the ODE likelihood)
        tangent = jax.jit(lambda q: jax.jvp(ours, (q, k, v), (g, g, g))[1])(q)
        expected = jax.jvp(reference, (q, k, v), (g, g, g))[1]
        np.testing.assert_allclose(tangent, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    with pytest.raises(ValueError, match="attention kind must be one of"):
        attention.dot_product_attention(q, k, v, kind="flash")


@pytest.mark.slow
def test_the_formulation_fields_compute_the_same_network():
    # The CPU formulation (chunked attention, two batch pieces) and per-block remat against the
    # defaults, in a training pass with dropout: the same eps_hat and parameter gradients.
    z, gamma = _inputs(batch=4)
    plain = ScoreUNet(**TINY, attention_everywhere=True)
    params = _perturb(_init(plain, z, gamma))

    def loss(model):
        def f(params):
            out = model.apply({"params": params}, z, gamma, train=True,
                              rngs={"dropout": jax.random.key(3)})  # fmt: skip
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.grad(f, has_aux=True))(params)

    expected = loss(plain)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(expected))
    for fields in ({"attention": "chunked", "batch_pieces": 2}, {"remat": True}):
        other = ScoreUNet(**TINY, attention_everywhere=True, **fields)
        shapes = jax.eval_shape(lambda z, g, m=other: _init(m, z, g), z, gamma)
        assert jax.tree.structure(shapes) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(loss(other)), jax.tree.leaves(expected), strict=True):
            # Absolute tolerance against the largest value of the tree: some gradients are 0
            # up to float32 rounding (1e-8) in both.
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * scale)
    for bad, match in (({"attention": "flash"}, "attention must be one of"),
                       ({"batch_pieces": 0}, "batch_pieces must be >= 1")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ScoreUNet(**TINY, **bad)
