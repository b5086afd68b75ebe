"""MuLAN in the training system: its config fields and refusals, the train and eval steps,
exact resume, jit against pmap, evaluation and sampling, and the import of the authors'
checkpoints (tests/fixtures/mulan) into a run that evaluates, samples and trains on."""

import json
import logging
import math
import pathlib
import shutil

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from vdm_jax import pretrained
from vdm_jax.configs import cifar10_mulan, digits, digits_mulan
from vdm_jax.errors import UserError
from vdm_jax.models.mulan import MuLAN
from vdm_jax.training import builders, importer, parallel, run_files, schema, steps, trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "mulan"


def _config(**overrides):
    """digits_mulan:smoke shrunk further, on one device; ``section__field=value`` overrides."""
    config = digits_mulan.get_config("smoke")
    config.model.n_embd = 8
    config.model.encoder_n_layer = 0
    config.model.encoder_n_embd = 8
    config.model.schedule_features = 4
    config.model.latent_size = 4
    config.parallel.num_devices = 1
    config.training.keep_checkpoints = 5
    config.eval.batch_size = 297  # the digits' test split in one batch
    config.sampling.num_samples = 4
    config.sampling.sampling_steps = 2
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def _assert_bitwise_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _records(workdir) -> list[dict]:
    return [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]


# ---------------------------------------------------------------------------------------------
# The config.


def test_configs_build_mulan_and_refuse_fields_without_meaning(tmp_path):
    for config in (digits_mulan.get_config(), cifar10_mulan.get_config("smoke")):
        schema.check_config(config)
    model = builders.model_from_config(_config(), 17, (8, 8, 1))
    assert isinstance(model, MuLAN) and model.latent_kind == "gaussian"
    assert model.schedule.image_shape == (8, 8, 1) and model.parameterization == "v"
    with pytest.raises(UserError, match="needs the data's image_shape"):
        builders.model_from_config(_config(), 17)

    # Every field with no meaning for a per-pixel schedule, named in one error.
    config = digits.get_config()
    config.model.family = "mulan"
    config.objective.weighting = "sigmoid"
    config.objective.noise_levels = "adaptive"
    config.model.timesteps = 10
    config.sampling.sampler = "ode"
    with pytest.raises(UserError) as error:
        schema.check_config(config)
    message = str(error.value)
    for part in ("objective.weighting='sigmoid' (use 'elbo')",
                 "objective.noise_levels='adaptive' (use 'schedule')",
                 "model.timesteps=10 (use 0)", "model.reconstruction_window=4 (use 0)",
                 "sampling.sampler='ode' (use 'ancestral' or 'ddim')"):  # fmt: skip
        assert part in message, message
    assert message.startswith("model.family='mulan'") and "or use model.family='vdm'" in message
    with pytest.raises(UserError, match=r"model\.latent_k=9 exceeds model\.latent_size=4"):
        schema.check_config(_config(model__latent_kind="topk", model__latent_k=9))
    # The same fields of a VDM config are the VDM's to use.
    schema.check_config(_config(model__family="vdm", model__reconstruction_window=4))

    with pytest.raises(UserError, match=r"a MuLAN run .* has none"):
        trainer.report(_config(), str(tmp_path / "absent"))
    assert not (tmp_path / "absent").exists()


# ---------------------------------------------------------------------------------------------
# Training, exact resume, evaluation and sampling.


@pytest.mark.slow
def test_a_restart_from_step_2_ends_bitwise_equal_then_eval_dense_vlb_and_sample(tmp_path):
    """4 steps at once ('whole', checkpoints at 2 and 4); its copy without the step-4
    checkpoint (a run stopped after step 2) started again to step 4 ('resumed'). Then, on the
    resumed run, --mode=eval (vlb, and dense_vlb at K = 2 on 2 images) and --mode=sample.
    (The resume of a run trained to 2 steps, raised to 4, is tested on VDM in
    tests/test_experiment.py: the trainer's path, whatever the model.)"""
    whole_dir, resumed_dir = tmp_path / "whole", tmp_path / "resumed"
    whole = trainer.train_and_evaluate(_config(), str(whole_dir))
    assert sorted(int(p.name) for p in (whole_dir / "checkpoints").iterdir()) == [2, 4]
    shutil.copytree(whole_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")
    resumed = trainer.train_and_evaluate(_config(), str(resumed_dir))
    assert int(whole.step) == int(resumed.step) == 4
    _assert_bitwise_equal(whole, resumed)
    # The second start trained steps 3 and 4 only: one more training record, at step 4.
    logged = [r["step"] for r in _records(resumed_dir) if "latent_bpd" in r]
    assert logged == [2, 4, 4]
    # The metrics: VDM's keys and the latent's term, the bound their sum.
    records = _records(whole_dir)
    logged = [r for r in records if "latent_bpd" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        terms = r["latent_bpd"] + r["prior_bpd"] + r["reconstruction_bpd"] + r["diffusion_bpd"]
        assert r["bpd"] == pytest.approx(terms, rel=1e-5) and r["loss"] == r["bpd"]
        assert (r["gamma_0"], r["gamma_1"]) == (-8.0, 6.0)  # the fixed endpoints
        assert r["latent_bpd"] > 0 and math.isfinite(r["grad_norm"])
    final = records[-1]
    assert final["step"] == 4 and final["test/num_examples"] == 297
    terms = sum(final[f"test/{k}_bpd"] for k in ("latent", "prior", "reconstruction", "diffusion"))
    assert final["test/bpd"] == pytest.approx(terms, rel=1e-6)
    assert len(list((whole_dir / "samples").iterdir())) == 1

    results = trainer.evaluate(_config(), str(resumed_dir))
    # One exact pass with the run's evaluation key: the training run's final figures again.
    for key in ("test/bpd", "test/latent_bpd", "test/diffusion_bpd", "test/num_examples"):
        assert results[key] == pytest.approx(final[key], rel=1e-6)
    config = _config(eval__estimator="dense_vlb", eval__num_draws=2, eval__num_examples=2)
    dense = trainer.evaluate(config, str(resumed_dir))
    assert dense["test/dense_vlb_num_examples"] == 2
    assert np.isfinite(dense["test/dense_vlb_bpd"]) and dense["test/dense_vlb_bpd"] > 0
    assert dense["test/dense_vlb_latent_bpd"] > 0
    for sampler, latent in (("ancestral", "prior"), ("ddim", "deterministic")):
        config = _config(sampling__sampler=sampler, sampling__latent=latent)
        path = trainer.sample(config, str(resumed_dir))
        image = np.asarray(Image.open(path))
        assert f"_{sampler}2_argmax" in path and image.size > 0


@pytest.mark.slow
def test_jit_and_pmap_give_the_same_mulan_trajectory():
    config = _config()
    model = builders.model_from_config(config, 17, (8, 8, 1))
    # Plain SGD, so that the parameters show the gradients themselves: Adam divides each by
    # its running RMS, which turns the rounding of a near-cancelling gradient (in a different
    # order under pmap) into a large part of a step (as in tests/test_train.py).
    optimizer = optax.sgd(0.01)
    example = jnp.zeros((1, 8, 8, 1), jnp.uint8)
    state = jax.jit(lambda key: steps.init_state(model, optimizer, key, example))(jax.random.key(0))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 17, (4, 8, 8, 1)).astype(np.uint8)} for _ in range(2)]
    out = {}
    for mode in ("jit", "pmap"):
        dp = parallel.DataParallel(mode, parallel.make_mesh(2))
        step = dp.compile_train_step(steps.make_train_step(model, optimizer, 0.9))
        carry, figures = dp.put_state(state), []
        for batch in batches:
            carry, metrics = step(carry, dp.put_batch(batch), jax.random.key(1))
            for name in ("latent_bpd", "bpd", "grad_norm"):
                figures.append(np.asarray(metrics[name]).reshape(-1)[0])
        out[mode] = np.array(figures), jax.device_get(dp.get_state(carry)).params
    np.testing.assert_allclose(out["jit"][0], out["pmap"][0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        out["jit"][1], out["pmap"][1],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The authors' checkpoints as runs of ours.


def _fixture(name):
    root = FIXTURES / name
    if not (root / "expected.npz").exists():
        pytest.skip(f"no MuLAN fixture {name} under {FIXTURES}")
    return root


def _image_folder(root: pathlib.Path, images: np.ndarray) -> pathlib.Path:
    """The fixture's images as both splits of an image folder (one class)."""
    for split in ("train", "test"):
        (root / split / "0").mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / split / "0" / f"{i:02d}.png")
    return root


def _import_config(images: pathlib.Path, **overrides):
    """cifar10_mulan:smoke on the fixture's images (the model fields come from the tree)."""
    config = cifar10_mulan.get_config("smoke")
    config.data.name = "folder"
    config.data.data_dir = str(images)
    config.parallel.num_devices = 1
    config.training.batch_size = 4
    config.eval.batch_size = 4
    config.sampling.num_samples = 2
    config.sampling.sampling_steps = 2
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def _adam_mu(opt_state):
    def is_adam(x):
        return isinstance(x, optax.ScaleByAdamState)

    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    assert len(found) == 1
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gaussian_velocity", "topk_velocity"])
def test_import_eval_and_train_on(tmp_path, name, cli, capsys, caplog):
    """The import (topk by the command line's --mode=import, in process: the command line's
    import as a subprocess is tested on the original code's checkpoints, test_pretrained.py),
    then eval; for the gaussian latent also 2 more training steps. (Sampling a MuLAN run:
    the restart test above; the samplers and gradients of both latents: test_mulan.py.)"""
    root = _fixture(name)
    expected = np.load(root / "expected.npz")
    made = json.loads((root / "made_with.json").read_text())
    images = _image_folder(tmp_path / "images", expected["images"])
    work = tmp_path / "run"
    if made["latent_type"] == "topk":
        caplog.set_level(logging.WARNING)
        cli.in_process(
            "--mode=import", f"--import_from={root}", "--config=cifar10_mulan:smoke",
            "--config.data.name=folder", f"--config.data.data_dir={images}",
            "--config.parallel.num_devices=1", "--config.model.latent_k=5", f"--workdir={work}",
        )  # fmt: skip
        # Each model field the tree sets, by name; what the tree does not record, assumed.
        out = capsys.readouterr().out
        assert "model.n_embd: 32 from the checkpoint (the config has 16)" in out
        assert "model.latent_size: 16 from the checkpoint (the config has 50)" in out
        assert f"imported step {made['steps']}" in out
        assert "does not record model.parameterization='v', model.latent_k=5" in caplog.text
        config = _import_config(images, model__latent_k=made["latent_k"])
    else:
        config = _import_config(images)
        result = importer.import_original(config, str(work), str(root))
        assert result.step == made["steps"]
        assert result.differences["n_embd"] == (16, 32)  # the smoke config's, the tree's
    assert made["steps"] == 20
    saved = run_files.read_config(work)
    assert saved["model"]["family"] == "mulan"
    assert saved["model"]["latent_kind"] == made["latent_type"]
    assert saved["model"]["latent_size"] == made["latent_size"]
    if made["latent_type"] == "topk":
        assert saved["model"]["latent_k"] == made["latent_k"]
    assert (saved["model"]["encoder_n_layer"], saved["model"]["schedule_features"]) == (1, 2)
    marker = json.loads((work / importer.MARKER).read_text())
    assert marker["assumed"]["model.parameterization"] == "v"

    # The run holds their parameters, EMA and Adam moments (score network: their first AdamW,
    # encoder and schedule: their second).
    run_config = schema.for_trained_run(config, saved)
    restored = trainer.restore_state(run_config, str(work))
    loaded = pretrained.load_mulan_checkpoint(root, latent_k=made["latent_k"])[1]["params"]
    ours = flax.traverse_util.flatten_dict(restored.state.ema_params)
    for key, value in flax.traverse_util.flatten_dict(loaded).items():
        np.testing.assert_array_equal(ours[key], value)
    state = flax.serialization.msgpack_restore(
        (root / "checkpoints-0" / "ckpt-1.flax").read_bytes()
    )
    adam = _adam_mu(restored.state.opt_state)
    theirs = state["opt_state"]
    np.testing.assert_array_equal(
        adam.mu["score_net"]["conv_in"]["kernel"],
        theirs["0"]["inner_state"]["0"]["mu"]["score_model"]["conv_in"]["kernel"],
    )
    np.testing.assert_array_equal(
        adam.nu["schedule"]["dense_out_b"]["kernel"],
        theirs["1"]["inner_state"]["0"]["nu"]["gamma"]["dense_out_b"]["kernel"],
    )
    assert int(adam.count) == int(theirs["0"]["inner_state"]["0"]["count"]) == 20
    np.testing.assert_array_equal(
        restored.state.ema_params["schedule"]["dense_1"]["kernel"],
        state["ema_params"]["gamma"]["dense_1"]["kernel"],
    )

    # Eval: one draw per image, their 64: the same bound within 4 standard errors.
    results = trainer.evaluate(run_config, str(work))
    assert results["test/num_examples"] == 4 and results["test/latent_bpd"] >= 0
    to_bpd = 1 / (3072 * np.log(2))
    theirs_bpd = expected["vlb_terms_mean"].sum(0).mean() * to_bpd
    their_se = np.sqrt(np.sum(expected["vlb_terms_std"] ** 2, 0) / 64).mean() * to_bpd
    gap = abs(results["test/bpd"] - theirs_bpd)
    assert gap < 4 * np.hypot(results["test/bpd_stderr"], their_se), (results, theirs_bpd)
    if made["latent_type"] == "topk":
        return  # training on goes through the trainer as for the gaussian latent

    # Training on, 2 more steps.
    more = schema.for_trained_run(_import_config(images, training__num_train_steps=22), saved)
    final = trainer.train_and_evaluate(more, str(work))
    assert int(final.step) == 22
    trained = [r for r in _records(work) if "latent_bpd" in r]
    assert trained and all(math.isfinite(r["bpd"]) for r in trained)


def test_import_refuses_mismatched_data_and_fields_without_meaning(tmp_path):
    root = _fixture("gaussian_velocity")
    with pytest.raises(UserError, match=r"MuLAN's for images of shape \(32, 32, 3\).*\(8, 8, 1\)"):
        importer.import_original(digits_mulan.get_config("smoke"), str(tmp_path / "a"), str(root))
    images = _image_folder(tmp_path / "images", np.zeros((2, 32, 32, 3), np.uint8))
    config = _import_config(images, objective__weighting="sigmoid")
    with pytest.raises(UserError, match=r"gives no meaning to objective\.weighting='sigmoid'"):
        importer.import_original(config, str(tmp_path / "b"), str(root))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # nothing written
