"""End to end: train_and_evaluate, resume, evaluate, sample, the command line, bad input."""

import json
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vdm_jax import cli as command_line
from vdm_jax.configs import cifar10, digits
from vdm_jax.errors import UserError
from vdm_jax.training import trainer


def _smoke(**overrides):
    """``digits:smoke`` on one device, as ``digits_smoke_run`` trains it."""
    config = digits.get_config("smoke")
    config.parallel.num_devices = 1
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
def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path, digits_smoke_run):
    """A run of 2 steps, then raised to 4 and resumed, ends where the uninterrupted 4-step
    run (``digits_smoke_run``) ended."""
    whole = digits_smoke_run[1]
    trainer.train_and_evaluate(_smoke(**{"training.num_train_steps": 2}), str(tmp_path))
    resumed = trainer.train_and_evaluate(_smoke(), str(tmp_path))
    assert int(resumed.step) == int(whole.step) == 4
    jax.tree.map(np.testing.assert_array_equal, resumed.params, whole.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, whole.opt_state)


@pytest.mark.slow
def test_pmap_mode_trains_too(tmp_path, digits_smoke_run):
    """2 steps in pmap mode against jit mode's state at step 2 (``digits_smoke_run``'s first
    checkpoint: its learning rate does not depend on the number of steps), both on one device:
    the trainer's pmap layout end to end. pmap's cross-device step against jit's, on 8
    devices: test_train.py. (Against jit on another number of devices, Adam turns the sign of
    a near-zero gradient that the two round apart into a whole learning-rate step.)"""
    jit_state = trainer.restore_state(_smoke(), str(digits_smoke_run[0]), 2).state
    pmap_state = trainer.train_and_evaluate(
        _smoke(**{"training.num_train_steps": 2, "parallel.mode": "pmap"}), str(tmp_path / "p")
    )
    assert int(jit_state.step) == int(pmap_state.step) == 2
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        jit_state.params,
        pmap_state.params,
    )


@pytest.mark.slow
def test_train_on_tfds_mock_data(tmp_path):
    config = cifar10.get_config("smoke")
    config.training.num_train_steps = 2
    config.parallel.num_devices = 1
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
        (
            {"training.batch_size": 12, "parallel.num_devices": 8},
            "global batch size 12 is not divisible by the 8 devices",
        ),
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


@pytest.mark.slow
def test_command_line_eval_and_sample_read_the_run_s_config(
    digits_smoke_copy, cli, capsys, caplog, monkeypatch
):
    """From a folder outside the checkout, on a trained run: eval with no --config (the run's
    own), as a process; sample with the full digits config (forgetting ':smoke'), whose
    sampling settings apply while the model comes from the run, the command line's main in
    this process; a model field that disagrees with the run is one error line naming it.
    (Training from the command line: test_reliability.py's kill test.)"""
    run, outside = digits_smoke_copy, digits_smoke_copy.parent
    records = len((run / "metrics.jsonl").read_text().splitlines())
    evaluated = cli.run("--mode=eval", f"--workdir={run}", cwd=outside)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "over 297 examples" in evaluated.stderr
    assert re.search(r"per-pixel independent baseline 2\.42\d\d bpd", evaluated.stderr)
    assert "read only" not in evaluated.stderr and "read_only" not in evaluated.stderr
    lines = (run / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert len(lines) == records + 1
    assert record["step"] == 4 and "test/independent_pixel_baseline_bpd" in record
    monkeypatch.chdir(outside)
    argv = command_line.parse_flags(
        ["vdm_jax", "--config=digits", "--mode=sample", f"--workdir={run}",
         "--config.sampling.sampler=ddim", "--config.sampling.sampling_steps=5",
         "--config.sampling.num_samples=4"]
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="absl"):  # parsing the flags sets absl's level
        command_line.main(argv)
    # The digits have a feature extractor: sampling reports the samples' Frechet distance.
    assert "digits Frechet distance (a small" in caplog.text, caplog.text[-3000:]
    assert "not comparable with FID" in caplog.text
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["frechet_digits"] > 0 and last["frechet_samples"] == 4
    # Another sampler at the same step: a second file beside the training grid.
    assert sorted(os.listdir(run / "samples")) == [
        "step00000004_ancestral10_argmax.png",
        "step00000004_ddim5_argmax.png",
    ]
    before = sorted(os.listdir(run))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # the error exit itself: test_reliability.py
        cli.in_process("--mode=eval", f"--workdir={run}", "--config.model.n_embd=8")
    assert exited.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: --config.model.n_embd=8 disagrees with the trained run, which has "
        "model.n_embd=16: the run's checkpoint fixes it; drop the flag"
    ]
    assert sorted(os.listdir(run)) == before


@pytest.mark.slow
def test_console_script_outside_the_checkout_takes_a_bundled_name_or_a_path(
    tmp_path, cli, capsys, monkeypatch
):
    """From a folder outside the checkout, ``--config`` finds a bundled config by its name and
    a config file by its path; ``--mode=show_config`` prints each field's value, default and
    meaning without training. The console script runs the path; the same ``main`` in this
    process, the name."""
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
    proc = subprocess.run(
        [script, "--config=my_config.py:24", "--mode=show_config", "--config.seed=7"],
        cwd=tmp_path, env=cli.env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    cli.in_process("--config=digits:smoke", "--mode=show_config", "--config.seed=7")
    shown = {"my_config.py:24": proc.stdout, "digits:smoke": capsys.readouterr().out}
    for config, width in (("digits:smoke", 16), ("my_config.py:24", 24)):
        text = shown[config]
        assert re.search(
            rf"^model\.n_embd = {width} +\[default 128\] +channels of the score", text, re.M
        )
        assert re.search(r"^seed = 7 +\[default 0\] +seeds the parameters", text, re.M)
        assert re.search(
            r"^data\.name = 'digits' +\[default 'cifar10'\] +digits \| cifar10", text, re.M
        )


def test_a_bug_inside_jax_keeps_its_traceback(tmp_path, cli, capsys, monkeypatch):
    """A ValueError that is not a user error (here a shape bug inside the traced model) is not
    turned into a one-line message: it leaves the command line's ``main`` as it was raised,
    and absl's ``app.run`` prints its traceback and exits 1."""
    from vdm_jax.models import vdm as model

    def broken(self, z, *args, **kwargs):
        return jax.numpy.broadcast_to(z, (3,))  # a shape error: jax raises ValueError

    monkeypatch.setattr(model.VDM, "predict_noise", broken)
    with pytest.raises(ValueError, match="Cannot broadcast") as raised:
        cli.in_process("--config=digits:smoke", f"--workdir={tmp_path / 'w'}")
    assert not isinstance(raised.value, UserError)
    assert not any(line.startswith("error: ") for line in capsys.readouterr().err.splitlines())
