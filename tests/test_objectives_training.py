"""Weighted objectives and adaptive noise levels in the pure train step.

The step runs a one-layer per-pixel network, which compiles in a second. Elsewhere: the closed
forms of the weightings and of importance sampling on Gaussian data (test_weightings.py); the
kill test of test_reliability.py trains with sigmoid weighting, adaptive noise levels and
v-prediction through the command line, checks the logged loss beside the bound and that the
histogram resumes bitwise after SIGKILL; the command-line test of test_experiment.py checks
that ``--mode=sample`` reports the digits Frechet distance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.maths import weightings
from vdm_jax.models.vdm import VDM, make_schedule
from vdm_jax.training import parallel, sources, steps

from tiny_networks import PixelNet

VOCAB, BINS, NUM_STEPS, BATCH = 17, 16, 12, 16
WEIGHTING = weightings.get_weighting("sigmoid", bias=2.0)


MODEL = VDM(
    PixelNet(),
    make_schedule("learned_linear", gamma_min=-8.0, gamma_max=6.0),
    vocab_size=VOCAB,
    weighting=WEIGHTING,
    parameterization="v",
    antithetic_time_sampling=False,  # independent draws: honest standard errors below
)
IMAGES = np.stack([r["image"] for r in sources.digits_source("train")])[: NUM_STEPS * BATCH]


def _train(mode):
    """NUM_STEPS train steps with adaptive noise levels on 8 devices; per-step metrics and the
    final state."""
    optimizer = steps.make_optimizer(learning_rate=1e-3)
    example = jnp.zeros((1, 8, 8, 1), jnp.uint8)
    state = steps.init_state(MODEL, optimizer, jax.random.key(0), example, noise_bins=BINS)
    dp = parallel.DataParallel(mode, parallel.make_mesh(8))
    train_step = steps.make_train_step(MODEL, optimizer, 0.9, noise_floor=0.1, noise_decay=0.5)
    step = dp.compile_train_step(train_step, 1)
    device_state, records = dp.put_state(state), []
    for i in range(NUM_STEPS):
        batch = {"image": IMAGES[i * BATCH : (i + 1) * BATCH]}
        device_state, metrics = step(device_state, dp.put_batch(batch), jax.random.key(1))
        host = jax.device_get(metrics)
        records.append({k: float(np.asarray(v).reshape(-1)[0]) for k, v in host.items()})
    return records, jax.device_get(dp.get_state(device_state))


@pytest.fixture(scope="module")
def jit_run():
    return _train("jit")


@pytest.mark.slow
def test_the_histogram_is_averaged_over_devices_alike_in_jit_and_pmap(jit_run):
    jit_records, jit_state = jit_run
    pmap_records, pmap_state = _train("pmap")
    # 'loss' is the trained objective beside the bound of the same pass; w < 1 everywhere.
    assert all(r["loss"] < r["bpd"] for r in jit_records)
    histogram = np.asarray(jit_state.noise_histogram)
    assert histogram.shape == (BINS,) and histogram.dtype == np.float32
    assert not np.allclose(histogram, 1.0)
    # Under pmap each device sees 2 examples: equal histograms mean the per-bin sums and
    # counts were reduced over all devices, as jit does over the global batch.
    np.testing.assert_allclose(pmap_state.noise_histogram, histogram, rtol=2e-5)
    for a, b in zip(jit_records, pmap_records, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5)
        np.testing.assert_allclose(a["bpd"], b["bpd"], rtol=2e-5)


@pytest.mark.slow
def test_adapted_noise_levels_keep_the_mean_and_lower_the_variance(jit_run):
    """The weighted diffusion term with the trained parameters: the schedule's uniform t
    against the histogram the train steps adapted, over 2048 independent draws each."""
    _, state = jit_run
    params = {"params": state.params}
    probs = weightings.histogram_probs(state.noise_histogram, 0.1)
    images = jnp.asarray(IMAGES[:BATCH])

    def weighted_terms(noise_level_probs):
        def one(key):
            terms, objective = MODEL.apply(
                params, images, train=False, rngs={"diffusion": key},
                noise_level_probs=noise_level_probs, return_objective=True,
            )  # fmt: skip
            return objective.objective - terms.prior - terms.reconstruction

        keys = jax.random.split(jax.random.key(2), 128)
        return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64).ravel()

    uniform, adapted = weighted_terms(None), weighted_terms(probs)
    stderr = math.hypot(uniform.std(), adapted.std()) / math.sqrt(uniform.size)
    print(
        f"\nweighted diffusion term per example, nats: uniform t mean {uniform.mean():.4g} "
        f"variance {uniform.var():.4g}; adapted mean {adapted.mean():.4g} "
        f"variance {adapted.var():.4g} ({NUM_STEPS} steps, {BINS} bins)"
    )
    assert abs(adapted.mean() - uniform.mean()) < 4 * stderr
    assert adapted.var() < 0.7 * uniform.var()
