"""Evaluation and sampling passes of the command line (vdm_jax.training.evaluate*): resumed
passes give the uninterrupted figure and images bitwise, 1 and 8 devices agree, finished
passes are read back, and bad settings are one ``error:`` line.

The passes run in this process on the shared ``digits:smoke`` run; "interrupted" is
``stop_after=k`` (a pass that stops after k batches, as a kill would leave it).
"""

import json
import os
import time

import numpy as np
import pytest

from vdm_jax import cli as command_line
from vdm_jax.configs import digits
from vdm_jax.training import evaluate, evaluate_samples, trainer


def _config(**fields):
    config = digits.get_config("smoke")
    for name, value in fields.items():
        section, key = name.split("__")
        config[section][key] = value
    return config


def _dense(**fields):
    """dense_vlb with K = 2 on the first 20 test images in batches of 8: 3 batches, the last
    one padded."""
    fields = dict(eval__estimator="dense_vlb", eval__num_draws=2, eval__num_examples=20,
                  eval__batch_size=8) | fields  # fmt: skip
    return _config(**fields)


def _batches(folder):
    names = sorted(n for n in os.listdir(folder) if n.startswith("batch_"))
    return {n: dict(np.load(os.path.join(folder, n))) for n in names}


def _eval_folder(workdir):
    (name,) = os.listdir(workdir / "eval")
    return workdir / "eval" / name


def _metric_lines(workdir):
    return (workdir / "metrics.jsonl").read_text().splitlines()


@pytest.mark.slow
def test_a_stopped_evaluation_resumes_to_the_uninterrupted_figure_bitwise(digits_smoke_copy):
    workdir = digits_smoke_copy
    assert evaluate.evaluate_likelihood(_dense(), str(workdir), stop_after=1) is None
    folder = _eval_folder(workdir)
    assert sorted(_batches(folder)) == ["batch_000000.npz"]
    assert not (folder / "result.json").exists()
    resumed = evaluate.evaluate_likelihood(_dense(), str(workdir))
    per_example = _batches(folder)
    lines = len(_metric_lines(workdir))
    written = json.loads(_metric_lines(workdir)[-1])
    assert written["test/dense_vlb_bpd"] == resumed["test/dense_vlb_bpd"]

    # A finished pass is read back: nothing computed, nothing appended to the metrics.
    assert evaluate.evaluate_likelihood(_dense(), str(workdir)) == resumed
    assert len(_metric_lines(workdir)) == lines

    uninterrupted = trainer.evaluate(_dense(eval__recompute=True), str(workdir))
    assert uninterrupted == resumed  # every figure, to the bit
    again = _batches(folder)
    for name, arrays in per_example.items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(again[name][key], value, err_msg=f"{name} {key}")
    assert set(resumed) >= {
        "test/dense_vlb_bpd", "test/dense_vlb_bpd_stderr", "test/dense_vlb_spread_bpd",
        "test/dense_vlb_nfe", "test/dense_vlb_num_examples", "test/dense_vlb_num_draws",
        "test/dense_vlb_diffusion_bpd",
    }  # fmt: skip
    assert resumed["test/dense_vlb_num_examples"] == 20 and resumed["test/dense_vlb_nfe"] == 2
    masks = np.concatenate([a["mask"] for a in per_example.values()])
    assert masks.sum() == 20 and len(masks) == 24

    # Other settings get a folder of their own, next to the first.
    evaluate.evaluate_likelihood(_dense(eval__num_draws=1), str(workdir), stop_after=1)
    assert len(os.listdir(workdir / "eval")) == 2


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_figure(digits_smoke_copy):
    workdir = digits_smoke_copy
    eight = evaluate.evaluate_likelihood(_dense(), str(workdir))
    per_example_eight = _batches(_eval_folder(workdir))
    one = evaluate.evaluate_likelihood(
        _dense(parallel__num_devices=1, eval__recompute=True), str(workdir)
    )
    per_example_one = _batches(_eval_folder(workdir))
    assert one.keys() == eight.keys()
    for key in one:
        assert one[key] == pytest.approx(eight[key], rel=1e-5, abs=1e-6), key
    for name, arrays in per_example_one.items():
        np.testing.assert_allclose(arrays["bpd"], per_example_eight[name]["bpd"], rtol=1e-5)


@pytest.mark.slow
def test_the_ode_bound_on_one_and_eight_devices_is_the_same(digits_smoke_copy, cli):
    """8 images with K = 2 draws and 2 probes each, one batch: on 8 devices each solves one
    image, on 1 device all 8, each solve a batch of one: the same values to the bit.

    Both passes are ``--mode=eval`` processes with 8 CPU devices and XLA's default code
    emitters, as users run: the tests' compile-light emitters (conftest) round a loop of one
    solve and a loop of eight differently, which the adaptive solve amplifies."""
    workdir = digits_smoke_copy
    args = ["--mode=eval", f"--workdir={workdir}", "--config.eval.estimator=ode",
            "--config.eval.num_draws=2", "--config.eval.num_probes=2",
            "--config.eval.num_examples=8", "--config.eval.batch_size=8",
            "--config.eval.ode_rtol=0.1", "--config.eval.ode_atol=0.1"]  # fmt: skip
    figures, batches = [], []
    for extra in (["--config.parallel.num_devices=8"],
                  ["--config.parallel.num_devices=1", "--config.eval.recompute=True"]):  # fmt: skip
        done = cli.run(*args, *extra, devices=8, compile_light=False)
        assert done.returncode == 0, done.stderr[-3000:]
        figures.append(json.loads(_metric_lines(workdir)[-1]))
        (batch,) = _batches(_eval_folder(workdir)).values()
        batches.append(batch)
    (eight, one), (eight_batch, one_batch) = figures, batches
    for key, value in one_batch.items():
        np.testing.assert_array_equal(value, eight_batch[key], err_msg=key)
    assert one == eight
    assert one["test/ode_num_draws"] == 2 and one["test/ode_nfe"] > 2


@pytest.mark.slow
def test_samples_resume_and_do_not_depend_on_the_devices(digits_smoke_copy):
    """N = 10 images, one per device at a time: over 8 devices 2 batches (the last one short),
    stopped after one batch and resumed; then sampled again on 1 device (10 batches): the
    same images, to the bit."""
    workdir = digits_smoke_copy
    fields = dict(sampling__num_images=10, sampling__device_batch_size=1,
                  sampling__num_samples=4)  # fmt: skip
    assert evaluate_samples.sample_images(_config(**fields), str(workdir), stop_after=1) is None
    (parts,) = [n for n in os.listdir(workdir / "samples") if n.endswith(".parts")]
    assert sorted(os.listdir(workdir / "samples" / parts)) == ["batch_000000.npz", "settings.json"]
    path = trainer.sample(_config(**fields), str(workdir))  # resumes
    assert path.endswith(".npz") and not (workdir / "samples" / parts).exists()
    with np.load(path) as data:
        assert data.files == ["arr_0"]
        images = data["arr_0"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    # The digits' 17 grey levels, scaled to 0..255.
    assert set(np.unique(images)) <= set(np.round(np.arange(17) * 255 / 16).astype(np.uint8))
    description = json.loads(open(path.removesuffix(".npz") + ".json").read())
    assert description["key"] == "arr_0" and description["shape"] == [10, 8, 8, 1]
    assert description["settings"]["sampler"] == "ancestral"
    assert description["settings"]["num_steps"] == 10
    assert os.path.exists(path.removesuffix(".npz") + ".png")
    assert "frechet_digits" in json.loads(_metric_lines(workdir)[-1])

    # Read back, not sampled again.
    before = os.path.getmtime(path)
    assert evaluate_samples.sample_images(_config(**fields), str(workdir)) == path
    assert os.path.getmtime(path) == before

    fields.update(parallel__num_devices=1)
    assert evaluate_samples.sample_images(_config(**fields), str(workdir)) == path  # read back
    fields.update(sampling__recompute=True)
    assert evaluate_samples.sample_images(_config(**fields), str(workdir)) == path
    with np.load(path) as data:
        np.testing.assert_array_equal(data["arr_0"], images)


def _run_folder(tmp_path, **model):
    """A folder with a run's config.json (all that the checks read)."""
    run = tmp_path / "run"
    run.mkdir()
    config = digits.get_config("smoke")
    for key, value in model.items():
        config.model[key] = value
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    return run


def _cli_error(capsys, *args):
    """The one ``error:`` line of ``python -m vdm_jax ARGS``, run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        command_line.main(command_line.parse_flags(["vdm_jax", *args]))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--config.eval.estimator=odee"],
         "error: eval.estimator must be one of 'vlb', 'dense_vlb', 'discrete', 'ode', 'ode_iw', "
         "got 'odee'"),
        (["--config.eval.estimator=ode_iw", "--config.eval.num_draws=0"],
         "error: eval.num_draws must be a positive integer, got 0"),
        (["--config.eval.num_draws=4"],
         "error: eval.estimator='vlb' draws one noise level per image, got eval.num_draws=4; "
         "use eval.estimator='dense_vlb' for K > 1 levels per image"),
        (["--config.eval.estimator=ode", "--config.model.timesteps=100"],
         "error: eval.estimator='ode' needs a continuous-time model, but this one is "
         "discrete-time (model.timesteps=100); use eval.estimator='discrete' (its bound at "
         "T=100) or 'vlb'"),
        (["--config.eval.estimator=ode_iw", "--config.eval.num_probes=0"],
         "error: eval.num_probes must be a positive integer, got 0"),
        (["--config.eval.estimator=discrete"],
         "error: eval.estimator='discrete' needs T for a continuous-time model: set "
         "eval.discrete_timesteps (e.g. 1000)"),
    ],
    ids=["unknown", "K=0", "probes=0", "vlb K>1", "ode discrete-time", "discrete without T"],
)  # fmt: skip
def test_bad_evaluation_settings_are_one_error_line(tmp_path, capsys, flags, message):
    run = _run_folder(tmp_path)
    assert _cli_error(capsys, "--mode=eval", f"--workdir={run}", *flags) == message
    assert sorted(os.listdir(run)) == ["config.json"]  # nothing written


def test_discrete_is_refused_for_mulan_with_the_reason():
    from vdm_jax.configs import digits_mulan
    from vdm_jax.errors import UserError

    config = digits_mulan.get_config("smoke")
    config.eval.estimator = "discrete"
    message = r"^eval.estimator='discrete' has no MuLAN .* time only; use .*'dense_vlb'"
    with pytest.raises(UserError, match=message):
        evaluate.check_eval_config(config)
    for name in ("dense_vlb", "ode", "ode_iw"):
        config.eval.estimator = name
        evaluate.check_eval_config(config)


@pytest.mark.slow
def test_a_killed_sampling_process_resumes_to_the_same_images(digits_smoke_copy, cli):
    """SIGKILL of ``python -m vdm_jax --mode=sample`` (one CPU device, as a user's machine
    has) once a batch is on disk, the same command again, then the same images sampled in this
    process on 8 devices."""
    workdir = digits_smoke_copy
    args = ["--mode=sample", f"--workdir={workdir}", "--config.sampling.num_images=6",
            "--config.sampling.device_batch_size=1",
            "--config.sampling.sampling_steps=400"]  # fmt: skip
    proc = cli.start(*args)
    deadline = time.time() + 240
    parts = []
    while not parts and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        parts = [p for p in (workdir / "samples").glob("*.parts/batch_*.npz")]
    proc.kill()
    output, _ = proc.communicate()
    assert parts, output[-3000:]
    assert not list((workdir / "samples").glob("*.npz")), "finished before the kill"
    done = cli.run(*args, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: " in done.stderr
    (path,) = (workdir / "samples").glob("*.npz")
    with np.load(path) as data:
        images = data["arr_0"]
    assert not list((workdir / "samples").rglob("*.tmp-*"))

    config = _config(sampling__num_images=6, sampling__device_batch_size=1,
                     sampling__sampling_steps=400, sampling__recompute=True)  # fmt: skip
    assert evaluate_samples.sample_images(config, str(workdir)) == str(path)
    with np.load(path) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
