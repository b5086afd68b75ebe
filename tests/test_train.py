"""The train step, the optimizer and the two parallel modes on 8 fake devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vdm_jax as vdm
from vdm_jax.models.vdm import VDM, make_schedule
from vdm_jax.training import parallel, steps

from tiny_networks import PixelNet

VOCAB = 17


def _model(dropout=0.1, schedule="monotonic"):
    net = vdm.ScoreUNet(n_layer=1, n_embd=16, dropout_rate=dropout)
    return VDM(score_net=net, schedule=make_schedule(schedule, n_features=8), vocab_size=VOCAB)


def _batches(n, size=16):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, VOCAB, (size, 8, 8, 1)).astype(np.uint8)} for _ in range(n)]


def test_weight_decay_mask_leaves_biases_norms_and_schedule_alone():
    model, optimizer = _model(), steps.make_optimizer()
    example = jnp.zeros((1, 8, 8, 1), jnp.uint8)
    state = jax.eval_shape(lambda: steps.init_state(model, optimizer, jax.random.key(0), example))
    flat = dict(jax.tree_util.tree_flatten_with_path(steps.weight_decay_mask(state.params))[0])
    by_name = {jax.tree_util.keystr(k): v for k, v in flat.items()}
    assert by_name["['score_net']['conv_in']['kernel']"]
    assert not by_name["['score_net']['conv_in']['bias']"]
    assert not any(v for k, v in by_name.items() if "norm" in k and "scale" in k)
    assert not any(v for k, v in by_name.items() if "schedule" in k)
    assert any(v for k, v in by_name.items() if "schedule" not in k)


def test_learning_rate_schedule_and_bad_arguments():
    lr = steps.learning_rate_schedule(1e-3, 10, 100, 0.1)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(110)], [0.0, 5e-4, 1e-3, 1e-4], rtol=1e-5)
    with pytest.raises(ValueError, match="learning_rate must be non-negative, got -1"):
        steps.make_optimizer(learning_rate=-1)
    with pytest.raises(ValueError, match="parallel mode must be one of"):
        parallel.DataParallel("xmap", parallel.make_mesh(1))
    with pytest.raises(ValueError, match="global batch size 12 is not divisible by the 8 devices"):
        parallel.DataParallel("jit", parallel.make_mesh(8)).check_batch_size(12)


def _trajectory(mode, batches, steps_per_dispatch=1, num_devices=8):
    # Plain SGD and the learned linear schedule, so that the parameters show the gradients
    # themselves: Adam turns the sign of a near-zero gradient (float rounding) into a whole
    # learning-rate step, and the monotonic schedule's network rounds t's rows differently in
    # a batch of 2 (a device's shard under pmap) and of 16 (jit), which a few steps amplify.
    model = _model(schedule="learned_linear")
    optimizer = optax.sgd(0.01)
    state = steps.init_state(
        model, optimizer, jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.uint8)
    )
    dp = parallel.DataParallel(mode, parallel.make_mesh(num_devices))
    step = dp.compile_train_step(
        steps.make_train_step(model, optimizer, 0.9, steps.learning_rate_schedule(1e-3, 2, 0)),
        steps_per_dispatch,
    )
    device_state, losses = dp.put_state(state), []
    for i in range(0, len(batches), steps_per_dispatch):
        group = batches[i : i + steps_per_dispatch]
        batch = (
            group[0]
            if steps_per_dispatch == 1
            else {"image": np.stack([b["image"] for b in group])}
        )
        device_state, metrics = step(
            device_state, dp.put_batch(batch, stacked=steps_per_dispatch > 1), jax.random.key(1)
        )
        bpd = np.asarray(metrics["bpd"])
        losses.extend(bpd[0].reshape(-1) if mode == "pmap" else bpd.reshape(-1))
    return np.array(losses), jax.device_get(dp.get_state(device_state))


@pytest.fixture(scope="module")
def jit_trajectory():
    """``(losses, state)`` of 4 single steps in jit mode on the 8 fake devices: the reference
    of the tests below, computed once per test process."""
    return _trajectory("jit", _batches(4))


@pytest.mark.slow
def test_jit_and_pmap_give_the_same_trajectory_on_8_devices(jit_trajectory):
    jit_losses, jit_state = jit_trajectory
    pmap_losses, pmap_state = _trajectory("pmap", _batches(4))
    np.testing.assert_allclose(jit_losses, pmap_losses, rtol=1e-6)
    assert int(jit_state.step) == int(pmap_state.step) == 4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        jit_state.params,
        pmap_state.params,
    )
    # The loss moved: the updates were applied.
    assert not np.allclose(jit_losses[0], jit_losses[-1])


@pytest.mark.slow
def test_several_steps_per_dispatch_equal_single_steps(jit_trajectory):
    single, single_state = jit_trajectory
    scanned, scanned_state = _trajectory("jit", _batches(4), steps_per_dispatch=2)
    np.testing.assert_allclose(single, scanned, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5),
        single_state.ema_params,
        scanned_state.ema_params,
    )


@pytest.mark.slow
def test_one_and_eight_devices_see_the_same_random_numbers_per_shard(jit_trajectory):
    # With the same number of shards the step is the same computation whatever the device
    # count: 1 device running 8 shards equals 8 devices running one each (the first step of
    # the 8-device trajectory, whose first batch this is).
    batches = _batches(1)
    model = _model()
    optimizer = steps.make_optimizer(learning_rate=1e-3)
    state = steps.init_state(
        model, optimizer, jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.uint8)
    )
    step_fn = steps.make_train_step(model, optimizer, 0.9)
    one_device = jax.jit(lambda s, b, k: step_fn(s, b, k, num_shards=8))
    _, m1 = one_device(state, {"image": jnp.asarray(batches[0]["image"])}, jax.random.key(1))
    np.testing.assert_allclose(float(m1["bpd"]), jit_trajectory[0][0], rtol=1e-5)


@pytest.mark.slow
class TrainStepTest(chex.TestCase):
    """The pure train step, jitted and eager (chex variants): the same update either way."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_ema_step_and_metrics_agree_jitted_and_eager(self):
        # Eager, every operation compiles on its own: a one-layer network and the linear
        # schedule have the fewest (the U-Net op by op: test_nets.py), and the initialisation
        # is jitted in both variants (they are about the step).
        model = VDM(PixelNet(), make_schedule("learned_linear"), vocab_size=VOCAB)
        optimizer = steps.make_optimizer(learning_rate=1e-2)
        init = jax.jit(steps.init_state, static_argnums=(0, 1))
        state = init(model, optimizer, jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.uint8))
        batch = {"image": jnp.asarray(_batches(1, size=4)[0]["image"])}

        def step(s, ema_decay):
            return steps.train_step(
                s, batch, jax.random.key(1), model=model, optimizer=optimizer,
                ema_decay=ema_decay,
            )  # fmt: skip

        new, metrics = self.variant(step, static_argnums=1)(state, 0.75)
        reference, ref_metrics = jax.jit(step, static_argnums=1)(state, 0.75)
        assert int(new.step) == 1
        assert set(metrics) == {
            "loss", "bpd", "prior_bpd", "reconstruction_bpd", "diffusion_bpd", "gamma_0", "gamma_1",
            "grad_norm", "lr",
        }  # fmt: skip
        chex.assert_trees_all_close(metrics, ref_metrics, rtol=1e-5, atol=1e-6)
        assert metrics["loss"] == metrics["bpd"]  # the ELBO trains the bound itself
        # Adam divides by sqrt(v): rounding in near-zero gradients moves a parameter by a small
        # fraction of one update (lr 1e-2), so compare on that scale.
        chex.assert_trees_all_close(new.params, reference.params, rtol=1e-5, atol=1e-4)
        jax.tree.map(
            lambda e, p, p0: np.testing.assert_allclose(
                e, 0.75 * p0 + 0.25 * p, rtol=1e-5, atol=1e-7
            ),
            new.ema_params,
            new.params,
            state.params,
        )
