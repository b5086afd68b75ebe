"""End to end: train_and_evaluate, resume, evaluate, sample, the command line, bad input."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vdm_jax.configs import cifar10, digits
from vdm_jax.errors import UserError
from vdm_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(**overrides):
    config = digits.get_config("smoke")
    for dotted, value in overrides.items():
        section, name = dotted.split(".")
        config[section][name] = value
    return config


def _listing(path):
    return sorted(
        os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
    )


@pytest.mark.slow
def test_train_and_evaluate_on_digits_writes_everything(digits_smoke_run):
    workdir, state = digits_smoke_run
    assert int(state.step) == 4
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "bpd" in r] == [2, 4]
    final = records[-1]
    assert final["test/num_examples"] == 297  # every test example exactly once
    assert abs(final["test/independent_pixel_baseline_bpd"] - 2.42) < 0.01
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert os.listdir(workdir / "samples") == ["step00000004_ancestral10_argmax.png"]
    assert os.listdir(workdir / "tensorboard")
    assert json.loads((workdir / "data_info.json").read_text()) == {
        "name": "digits", "image_shape": [8, 8, 1], "vocab_size": 17, "num_classes": 10,
    }  # fmt: skip


@pytest.mark.slow
def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path):
    whole = trainer.train_and_evaluate(
        _smoke(**{"training.num_train_steps": 6}), str(tmp_path / "a")
    )
    trainer.train_and_evaluate(_smoke(**{"training.num_train_steps": 2}), str(tmp_path / "b"))
    resumed = trainer.train_and_evaluate(
        _smoke(**{"training.num_train_steps": 6}), str(tmp_path / "b")
    )
    assert int(resumed.step) == int(whole.step) == 6
    jax.tree.map(np.testing.assert_array_equal, resumed.params, whole.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, whole.opt_state)


@pytest.mark.slow
def test_pmap_mode_trains_too(tmp_path):
    jit_state = trainer.train_and_evaluate(
        _smoke(**{"training.num_train_steps": 2}), str(tmp_path / "j")
    )
    pmap_state = trainer.train_and_evaluate(
        _smoke(**{"training.num_train_steps": 2, "parallel.mode": "pmap"}), str(tmp_path / "p")
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5),
        jit_state.params,
        pmap_state.params,
    )


@pytest.mark.slow
def test_train_on_tfds_mock_data(tmp_path):
    config = cifar10.get_config("smoke")
    config.training.num_train_steps = 2
    config.eval.discrete_timesteps = 10
    with tfds.testing.mock_data(num_examples=20):
        trainer.train_and_evaluate(config, str(tmp_path))
    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["test/num_examples"] == 20
    assert np.isfinite(final["test/T10_bpd"])


@pytest.mark.slow
def test_incompatible_resume_stops_and_keeps_the_checkpoints(digits_smoke_copy):
    tmp_path = digits_smoke_copy
    before = _listing(tmp_path / "checkpoints")
    with pytest.raises(UserError, match=r"model\.n_embd=16 \(this run has 32\)"):
        trainer.train_and_evaluate(_smoke(**{"model.n_embd": 32}), str(tmp_path))
    assert _listing(tmp_path / "checkpoints") == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.name": "svhn"}, "svhn"),
        ({"training.batch_size": 12}, "global batch size 12 is not divisible by the 8 devices"),
        ({"model.schedule": "cosine"}, "model.schedule must be one of .*, got 'cosine'"),
        (
            {"training.num_train_steps": 0},
            "training.num_train_steps must be a positive integer, got 0",
        ),
        ({"model.dtype": "float16"}, "model.dtype must be one of 'float32', 'bfloat16'"),
        ({"parallel.mode": "xmap"}, "parallel.mode must be one of 'jit', 'pmap', got 'xmap'"),
        ({"data.name": "folder", "data.data_dir": "/nonexistent/images"}, "/nonexistent/images"),
    ],
)
def test_bad_config_stops_before_training(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        trainer.train_and_evaluate(_smoke(**overrides), str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists() or not os.listdir(
        tmp_path / "w" / "checkpoints"
    )


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        trainer.train_and_evaluate(_smoke(), str(path))


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO)  # this checkout's vdm_jax, whatever is installed
    env.pop("XLA_FLAGS", None)  # the command line sees the machine's real devices
    return subprocess.run(
        [sys.executable, "-m", "vdm_jax", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_command_line_train_then_eval_and_sample_read_the_run_s_config(tmp_path):
    """Run from a folder outside the checkout: train a bundled config by its name; eval with
    no --config (the run's own); sample with the full digits config (forgetting ':smoke'),
    whose sampling settings apply while the model comes from the run; a model field that
    disagrees with the run is one error line naming it."""
    run = tmp_path / "run"
    trained = _cli(
        "--config=digits:smoke", f"--workdir={run}", "--config.training.num_train_steps=2",
        cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "test bpd" in trained.stderr
    assert "Unable to initialize backend 'tpu'" not in trained.stderr
    evaluated = _cli("--mode=eval", f"--workdir={run}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "over 297 examples" in evaluated.stderr
    assert re.search(r"per-pixel independent baseline 2\.42\d\d bpd", evaluated.stderr)
    assert "read only" not in evaluated.stderr and "read_only" not in evaluated.stderr
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and "test/independent_pixel_baseline_bpd" in record
    sampled = _cli(
        "--config=digits", "--mode=sample", f"--workdir={run}",
        "--config.sampling.sampler=ddim", "--config.sampling.sampling_steps=5",
        "--config.sampling.num_samples=4", cwd=tmp_path,
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    # The digits have a feature extractor: sampling reports the samples' Frechet distance.
    assert "digits Frechet distance (a small" in sampled.stderr, sampled.stderr[-3000:]
    assert "not comparable with FID" in sampled.stderr
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["frechet_digits"] > 0 and last["frechet_samples"] == 4
    # Another sampler at the same step: a second file beside the training grid.
    assert sorted(os.listdir(run / "samples")) == [
        "step00000002_ancestral10_argmax.png",
        "step00000002_ddim5_argmax.png",
    ]
    before = sorted(os.listdir(run))
    bad = _cli("--mode=eval", f"--workdir={run}", "--config.model.n_embd=8", cwd=tmp_path)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: --config.model.n_embd=8 disagrees with the trained run, which has "
        "model.n_embd=16: the run's checkpoint fixes it; drop the flag"
    ]
    assert sorted(os.listdir(run)) == before


@pytest.mark.slow
def test_console_script_outside_the_checkout_takes_a_bundled_name_or_a_path(tmp_path):
    """From a folder outside the checkout, ``--config`` finds a bundled config by its name and
    a config file by its path; ``--mode=show_config`` prints each field's value, default and
    meaning without training."""
    script = os.path.join(os.path.dirname(sys.executable), "vdm-jax")
    if not os.path.exists(script):
        pytest.skip("the vdm-jax console script is not installed (pip install -e .)")
    (tmp_path / "my_config.py").write_text(
        "from vdm_jax.configs import digits\n\n"
        "def get_config(width):\n"
        "    config = digits.get_config('smoke')\n"
        "    config.model.n_embd = int(width)\n"
        "    return config\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)  # this checkout's vdm_jax, whatever is installed
    env.pop("XLA_FLAGS", None)
    shown = {}
    for config in ("digits:smoke", "my_config.py:24"):
        proc = subprocess.run(
            [script, f"--config={config}", "--mode=show_config", "--config.seed=7"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        shown[config] = proc.stdout
    for config, width in (("digits:smoke", 16), ("my_config.py:24", 24)):
        text = shown[config]
        assert re.search(
            rf"^model\.n_embd = {width} +\[default 128\] +channels of the score", text, re.M
        )
        assert re.search(r"^seed = 7 +\[default 0\] +seeds the parameters", text, re.M)
        assert re.search(
            r"^data\.name = 'digits' +\[default 'cifar10'\] +digits \| cifar10", text, re.M
        )


@pytest.mark.slow
def test_a_bug_inside_jax_keeps_its_traceback(tmp_path):
    """A ValueError that is not a user error (here a shape bug inside the traced model) is not
    turned into a one-line message."""
    script = (
        "import sys\n"
        "from vdm_jax.models import vdm as model\n"
        "import jax.numpy as jnp\n"
        "def broken(self, z, *args, **kwargs):\n"
        "    return jnp.broadcast_to(z, (3,))  # a shape error: jax raises ValueError\n"
        "model.VDM.predict_noise = broken\n"
        "from vdm_jax import cli\n"
        "sys.argv = ['vdm_jax', *sys.argv[1:]]\n"
        "cli.run()\n"
    )
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, "--config=vdm_jax/configs/digits.py:smoke",
         f"--workdir={tmp_path / 'w'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: Cannot broadcast" in proc.stderr, proc.stderr[-3000:]
    assert not any(line.startswith("error: ") for line in proc.stderr.splitlines())
