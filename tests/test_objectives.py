"""The VDM module's weighted objectives and adaptive noise levels (Kingma & Gao 2023)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.maths import losses, weightings
from vdm_jax.maths.schedules import FixedLinearSchedule
from vdm_jax.models.vdm import VDM

from tiny_networks import PixelNet

VOCAB = 17


IMAGES = jax.random.randint(jax.random.key(0), (16, 4, 4, 1), 0, VOCAB).astype(jnp.uint8)
RNGS = {"diffusion": jax.random.key(1)}


class _Both:
    """The bound and the objective of one pass, as attributes of one object."""

    def __init__(self, pair):
        terms, objective = pair
        self.__dict__.update(terms._asdict(), **objective._asdict())


def _terms(model, params, **kwargs):
    pair = model.apply(params, IMAGES, train=False, rngs=RNGS, return_objective=True, **kwargs)
    return _Both(pair)


def _model(**kwargs):
    return VDM(PixelNet(), FixedLinearSchedule(), vocab_size=VOCAB, **kwargs)


@pytest.fixture(scope="module")
def params():
    """The model's initial variables (while the tests run, not while pytest collects them)."""
    return _model().init({"params": jax.random.key(2), **RNGS}, IMAGES, train=False)


def test_elbo_objective_is_the_bound_itself(params):
    terms = _terms(_model(), params)
    np.testing.assert_array_equal(
        terms.objective, terms.prior + terms.reconstruction + terms.diffusion
    )
    np.testing.assert_array_equal(losses.bits_per_dim(terms.objective, 16), terms.bpd)
    assert terms.noise_bins is None and terms.noise_values is None


def test_weighted_objective_keeps_the_bound_of_the_same_pass(params):
    weighting = weightings.get_weighting("sigmoid", bias=2.0)
    elbo, weighted = _terms(_model(), params), _terms(_model(weighting=weighting), params)
    np.testing.assert_array_equal(weighted.bpd, elbo.bpd)  # the same t, noise and bound
    ratio = (weighted.objective - weighted.prior - weighted.reconstruction) / elbo.diffusion
    assert np.all(np.asarray(ratio) < 1.0) and np.all(np.asarray(ratio) > 0.0)
    assert not np.allclose(ratio, ratio[0])


@pytest.mark.slow
def test_uniform_adaptive_density_is_the_linear_schedule_and_reports_its_statistics(params):
    weighting = weightings.get_weighting("v_mse")
    uniform = jnp.full((8,), 1.0 / 8)
    plain = _terms(_model(weighting=weighting), params)
    adaptive = _terms(_model(weighting=weighting), params, noise_level_probs=uniform)
    # A uniform histogram over [gamma_0, gamma_1] is the fixed linear schedule of the same t.
    np.testing.assert_allclose(adaptive.diffusion, plain.diffusion, rtol=2e-5)
    np.testing.assert_allclose(adaptive.objective, plain.objective, rtol=2e-5)
    assert adaptive.noise_bins.shape == (16,) and adaptive.noise_bins.dtype == jnp.int32
    # The statistic is w ||eps - eps_hat||^2: the weighted loss over 1/2 gamma'(t).
    weighted = adaptive.objective - adaptive.prior - adaptive.reconstruction
    np.testing.assert_allclose(adaptive.noise_values, 2 * weighted / 18.3, rtol=1e-4)

    # A skewed histogram draws other levels but estimates the same bound, without bias.
    @jax.jit
    def diffusion_terms(probs):
        def one(key):
            rngs = {"diffusion": key}
            terms = _model().apply(params, IMAGES, train=False, rngs=rngs, noise_level_probs=probs)
            return terms.diffusion

        return jax.vmap(one)(jax.random.split(jax.random.key(3), 256)).ravel()

    reference = np.asarray(diffusion_terms(uniform))
    skewed = np.asarray(diffusion_terms(jnp.linspace(1.0, 8.0, 8) / 36.0))
    stderr = np.hypot(reference.std(), skewed.std()) / np.sqrt(reference.size)
    assert abs(skewed.mean() - reference.mean()) < 4 * stderr
    assert not np.allclose(skewed[:16], reference[:16])


def test_bad_objective_settings_raise(params):
    discrete = _model(weighting=weightings.get_weighting("sigmoid"), num_steps=10)
    with pytest.raises(ValueError, match="continuous-time loss"):
        discrete.apply(params, IMAGES, train=True, rngs=RNGS)
    evaluated = _terms(discrete, params)  # evaluation in discrete time reports the bound
    np.testing.assert_array_equal(losses.bits_per_dim(evaluated.objective, 16), evaluated.bpd)
    with pytest.raises(ValueError, match="adaptive noise levels need"):
        _terms(_model(variance_gradient=True), params, noise_level_probs=jnp.ones(4) / 4)
