"""Registering a schedule, a weighting, a network and a data source: the config check, the
command line's listing and the built model take the new name; a taken name or a bad factory is
one UserError; every registration is undone through the public unregister functions."""

import contextlib
import io
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vdm_jax as vdm
from vdm_jax.configs import digits
from vdm_jax.errors import UserError
from vdm_jax.maths import schedules
from vdm_jax.training import builders, schema, sources

VOCAB = 17


@pytest.fixture
def registered():
    """Yields a list to append ``unregister_fn, name`` pairs to; undoes them after the test."""
    undo = []
    yield undo
    for unregister, name in reversed(undo):
        unregister(name)


def _tiny_config(**fields):
    config = digits.get_config("smoke")
    for dotted, value in fields.items():
        section, name = dotted.split(".")
        config[section][name] = value
    schema.check_config(config)
    return config


def _bound_once(config):
    model = builders.model_from_config(config, VOCAB)
    x = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 8, 8, 1)), jnp.uint8)
    rngs = {"diffusion": jax.random.key(1), "dropout": jax.random.key(2)}
    params = model.init({"params": jax.random.key(0), **rngs}, x, train=False)
    terms, objective = model.apply(params, x, train=False, rngs=rngs, return_objective=True)
    assert terms.bpd.shape == (2,) and bool(jnp.all(jnp.isfinite(terms.bpd)))
    return model, params, terms, objective


def _flat(scale: float = 2.0):
    return lambda lam: jnp.full_like(lam, scale)


@pytest.mark.slow
def test_a_registered_weighting_is_checked_listed_and_trained(registered):
    vdm.register_weighting("flat2", _flat, monotone=True, description="w = 2.")
    registered.append((vdm.unregister_weighting, "flat2"))
    assert "flat2" in schema.field_meanings()["objective.weighting"]
    assert vdm.get_weighting("flat2", scale=3.0).params == (("scale", 3.0),)
    model, _, terms, objective = _bound_once(_tiny_config(**{"objective.weighting": "flat2"}))
    assert model.weighting.name == "flat2" and model.weighting.monotone
    # w = 2 everywhere doubles the ELBO's diffusion term in the objective.
    expected = terms.prior + terms.reconstruction + 2 * terms.diffusion
    np.testing.assert_allclose(objective.objective, expected, rtol=1e-5)


@pytest.mark.slow
def test_a_registered_schedule_is_checked_and_builds_the_model(registered):
    class Steep(schedules.FixedLinearSchedule):
        """gamma_min + (gamma_max - gamma_min) t, a registered copy of the fixed line."""

    vdm.register_schedule("steep", Steep)
    registered.append((vdm.unregister_schedule, "steep"))
    assert "steep" in schema.field_meanings()["model.schedule"]
    config = _tiny_config(**{"model.schedule": "steep"})
    model, params, _, _ = _bound_once(config)
    assert isinstance(model.schedule, Steep)
    gamma_0, gamma_1 = model.apply(params, method=model.endpoints)
    m = config.model
    assert (float(gamma_0), float(gamma_1)) == pytest.approx((m.gamma_min, m.gamma_max))


@pytest.mark.slow
def test_a_registered_network_builds_the_model(registered):
    def small_unet(m):
        return vdm.ScoreUNet(n_layer=1, n_embd=8, dropout_rate=0.0, num_classes=m.num_classes)

    builders.register_network("small", small_unet)
    registered.append((builders.unregister_network, "small"))
    assert schema.base_config().model.network == "unet"
    model, _, _, _ = _bound_once(_tiny_config(**{"model.network": "small"}))
    assert model.score_net.n_embd == 8


def test_a_registered_source_is_made_and_checked(registered):
    images = np.random.default_rng(0).integers(0, 4, (6, 5, 5, 1)).astype(np.uint8)

    def make(split, data_dir=None):
        return sources.array_source(images, np.zeros(6, np.int32), vocab_size=4, name="tiny")

    def info(data_dir=None):
        return make("train").info

    sources.register_source("tiny", make, info)
    registered.append((sources.unregister_source, "tiny"))
    assert "tiny" in sources.dataset_names()
    assert "tiny" in schema.field_meanings()["data.name"]
    config = _tiny_config(**{"data.name": "tiny"})
    assert sources.dataset_info(config.data.name).image_shape == (5, 5, 1)
    assert len(sources.make_source("tiny", "test")) == 6


def test_a_user_config_file_registers_for_the_command_line(tmp_path, registered):
    from vdm_jax import cli

    path = tmp_path / "my_config.py"
    path.write_text(
        textwrap.dedent("""
        import jax.numpy as jnp
        import vdm_jax
        from vdm_jax.configs import digits

        def _half(scale: float = 0.5):
            return lambda lam: jnp.full_like(lam, scale)

        def get_config():
            vdm_jax.register_weighting("half_cli", _half, monotone=True, description="w = 1/2.")
            config = digits.get_config("smoke")
            config.objective.weighting = "half_cli"
            return config
        """)
    )
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            cli.main(cli.parse_flags(["vdm_jax", f"--config={path}", "--mode=show_config"]))
    finally:
        registered.append((vdm.unregister_weighting, "half_cli"))
    shown = out.getvalue()
    assert "objective.weighting = 'half_cli'" in shown
    assert "half_cli" in shown.split("objective.weighting = ")[1].splitlines()[0]


@pytest.mark.parametrize(
    ("register", "args", "message"),
    [
        (vdm.register_weighting, ("elbo", _flat), "'elbo' is already registered"),
        (vdm.register_weighting, ("w", 3), "not callable"),
        (vdm.register_weighting, ("w", lambda scale: lambda lam: lam), "needs a float default"),
        (vdm.register_weighting, ("", _flat), "non-empty string"),
        (vdm.register_schedule, ("learned_linear", schedules.FixedLinearSchedule), "already"),
        (vdm.register_schedule, ("s", lambda: None), r"factory\(gamma_min, gamma_max\)"),
        (vdm.register_schedule, ("s", "fixed_linear"), r"factory\(gamma_min, gamma_max\)"),
        (builders.register_network, ("unet", lambda m: m), "'unet' is already registered"),
        (builders.register_network, ("n", lambda: None), r"factory\(config\.model\)"),
        (sources.register_source, ("cifar10", print, print), "'cifar10' is already registered"),
        (sources.register_source, ("d", print, None), "info_fn of 'd' is not callable"),
    ],
)
def test_a_taken_name_or_a_bad_factory_is_one_user_error(register, args, message):
    kwargs = {"monotone": True, "description": "."} if register is vdm.register_weighting else {}
    with pytest.raises(UserError, match=message):
        register(*args, **kwargs)


def test_unregistering_removes_the_name_and_keeps_the_built_in_ones(registered):
    vdm.register_weighting("gone", _flat, monotone=True, description=".")
    vdm.unregister_weighting("gone")
    config = digits.get_config("smoke")
    config.objective.weighting = "gone"
    with pytest.raises(UserError, match=r"objective\.weighting"):
        schema.check_config(config)
    for unregister, name in [
        (vdm.unregister_weighting, "elbo"),
        (vdm.unregister_schedule, "fixed_linear"),
        (builders.unregister_network, "unet"),
        (sources.unregister_source, "digits"),
        (sources.unregister_source, "never_registered"),
    ]:
        with pytest.raises(UserError, match="is not a registered"):
            unregister(name)
