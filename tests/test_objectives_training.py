"""Weighted objectives and adaptive noise levels in the train step and the trainer."""

import jax
import jax.numpy as jnp
import numpy as np

import vdm_jax as vdm
from vdm_jax.configs import digits
from vdm_jax.model import VDM, make_schedule
from vdm_jax.training import parallel, steps, trainer

VOCAB = 17


def _trajectory(mode, weighting, bins, num_steps=3):
    net = vdm.ScoreUNet(n_layer=1, n_embd=16, dropout_rate=0.0)
    model = VDM(net, make_schedule("learned_linear"), vocab_size=VOCAB, weighting=weighting)
    optimizer = steps.make_optimizer(learning_rate=1e-3)
    example = jnp.zeros((1, 8, 8, 1), jnp.uint8)
    state = steps.init_state(model, optimizer, jax.random.key(0), example, noise_bins=bins)
    dp = parallel.DataParallel(mode, parallel.make_mesh(8))
    step = dp.compile_train_step(
        parallel.make_train_step(model, optimizer, 0.9, noise_floor=0.2, noise_decay=0.5), 1
    )
    rng = np.random.default_rng(0)
    device_state, records = dp.put_state(state), []
    for _ in range(num_steps):
        batch = {"image": rng.integers(0, VOCAB, (16, 8, 8, 1)).astype(np.uint8)}
        device_state, metrics = step(device_state, dp.put_batch(batch), jax.random.key(1))
        host = jax.device_get(metrics)
        records.append({k: float(np.asarray(v).reshape(-1)[0]) for k, v in host.items()})
    return records, jax.device_get(dp.get_state(device_state))


def test_adaptive_histogram_is_averaged_over_devices_alike_in_jit_and_pmap():
    weighting = vdm.weightings.get("sigmoid", bias=1.0)
    jit_records, jit_state = _trajectory("jit", weighting, 8)
    pmap_records, pmap_state = _trajectory("pmap", weighting, 8)
    # 'loss' is the weighted objective, beside the bound of the same pass; w < 1 everywhere.
    assert all(r["loss"] < r["bpd"] for r in jit_records)
    histogram = np.asarray(jit_state.noise_histogram)
    assert histogram.shape == (8,) and not np.allclose(histogram, 1.0)
    np.testing.assert_allclose(pmap_state.noise_histogram, histogram, rtol=2e-5)
    for a, b in zip(jit_records, pmap_records, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
        np.testing.assert_allclose(a["bpd"], b["bpd"], rtol=2e-5)


def test_adaptive_histogram_is_checkpointed_and_resumes_bitwise(tmp_path):
    config = digits.get_config("smoke")
    config.objective.weighting = "sigmoid"
    config.objective.noise_levels = "adaptive"
    config.objective.noise_bins = 16
    config.training.num_train_steps = 4
    config.training.checkpoint_every = 2
    config.training.eval_every = 0
    config.sampling.num_samples = 1
    config.sampling.sampling_steps = 1
    straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
    config.training.num_train_steps = 2
    trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
    config.training.num_train_steps = 4
    resumed = trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
    straight, resumed = jax.device_get(straight), jax.device_get(resumed)
    assert not np.allclose(straight.noise_histogram, 1.0)
    np.testing.assert_array_equal(resumed.noise_histogram, straight.noise_histogram)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
