"""Reliability of a training run (issue 7): faults, divergence, damaged checkpoints, bad input.

Every case lives in a table or a test below; the module docstring of ``vdm_jax.training.trainer``
states the guarantees. Runs use the digits smoke config on one device (tiny model, a few
steps). Only the kill and command-line tests start subprocesses (conftest's ``cli``); they
share the session's persistent compilation cache, so that each start compiles in well under a
second after the first.
"""

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vdm_jax import cli as command_line
from vdm_jax.configs import digits
from vdm_jax.training import checkpoint, run_files, run_setup, sources, steps, trainer
from vdm_jax.training import schema as config_schema

# After a failed tensorstore read or an injected write error, orbax's asyncio helpers report
# "Event loop is closed" when garbage-collected; harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _config(**overrides) -> ml_collections.ConfigDict:
    """The digits smoke config on one device, no evaluation during training, with overrides
    given as ``section__field=value`` (``seed=...`` for the top level)."""
    config = digits.get_config("smoke")
    config.parallel.num_devices = 1
    config.training.eval_every = 0
    for name, value in overrides.items():
        if "__" in name:
            section, field = name.split("__")
            config[section][field] = value
        else:
            config[name] = value
    return config


def _raw_config(edit) -> ml_collections.ConfigDict:
    """A config built from a dict that ``edit`` changed, as a config file may hold any type."""
    d = _config().to_dict()
    edit(d)
    return ml_collections.ConfigDict(d)


def _snapshot(root: Path) -> list | None:
    """Every path under ``root``, with size and modification time for files (None if absent;
    folders by name only: probing a folder for writing touches its time)."""
    if not root.exists():
        return None
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        if p.is_file()
        else (str(p.relative_to(root)), "folder", 0)
        for p in root.rglob("*")
    )


def _steps(workdir: Path) -> list[int]:
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _restore(config, workdir, step=None) -> checkpoint.Restored:
    """A checkpoint of a run (the latest, or ``step``), restored as ``config`` lays it out."""
    return trainer.restore_state(config, str(workdir), step)


def _assert_bitwise_equal(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), "not bitwise equal"


# ----------------------------------------------------------------------------- subprocesses


def _flags(workdir, **overrides) -> list[str]:
    args = ["--config=digits:smoke", f"--workdir={workdir}"]
    settings = {"parallel.num_devices": 1, "training.eval_every": 0, **overrides}
    return args + [f"--config.{k}={v}" for k, v in settings.items()]


def _logged_steps(workdir) -> list[int]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return steps


def _wait_for_step(workdir, step, proc, timeout=240.0) -> None:
    deadline = time.monotonic() + timeout
    while max(_logged_steps(workdir), default=0) < step:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no step {step} after {timeout} s")
        time.sleep(0.005)


def _finish(proc, timeout=240.0) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


# ----------------------------------------------------------------------------- exact resume


def _saving(workdir) -> bool:
    """Whether a checkpoint write is in progress (orbax writes into ``*.orbax-checkpoint-tmp``)."""
    return any("tmp" in p.name for p in (Path(workdir) / "checkpoints").iterdir())


OBJECTIVE = {
    "objective.weighting": "sigmoid",
    "objective.bias": 2.0,
    "objective.noise_levels": "adaptive",
    "objective.noise_bins": 16,
    "model.parameterization": "v",
}


@pytest.mark.slow
def test_sigkill_sigterm_and_restart_end_bitwise_equal_to_an_uninterrupted_run(
    tmp_path, cli, caplog
):
    """One command-line run killed with SIGKILL during a checkpoint write, preempted with
    SIGTERM, killed with SIGKILL between writes, each time restarted with the same command,
    ends with the same bits as an uninterrupted run. The uninterrupted run and the last
    restart, which is killed no more, run in this process (on one of its 8 fake devices); the
    processes see 8 CPU devices too and use one, since XLA rounds a one-device program
    differently in a process that has 1 CPU device and in one that has 8.
    The kill steps are random (the seed is printed; set VDM_RELIABILITY_SEED to repeat a run).
    The runs train the weighted objective with adaptive noise levels and v-prediction, so the
    state includes the noise-level histogram and the log shows the trained loss beside the
    bound."""
    seed = int(os.environ.get("VDM_RELIABILITY_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    settings = {
        "training.num_train_steps": 24,
        "training.checkpoint_every": 2,
        "training.keep_checkpoints": 2,
        "training.log_every": 1,
        **OBJECTIVE,
    }
    ref_dir, dir_ = tmp_path / "uninterrupted", tmp_path / "interrupted"
    args = _flags(dir_, **settings)
    log = tmp_path / "interrupted.log"
    overrides = {k.replace(".", "__"): v for k, v in {**settings, **OBJECTIVE}.items()}
    config = _config(**overrides)
    # The uninterrupted run writes its last checkpoint only: saving must not change a bit of
    # the run, and each save costs as much as a few steps of this model.
    reference = _config(**{**overrides, "training__checkpoint_every": 24})
    trainer.train_and_evaluate(reference, str(ref_dir))
    events = []

    def run_until(step, sig, when):
        """Start the run, wait for ``step``, then for a moment ``when`` a checkpoint is being
        written ('saving') or not ('idle', once one exists), and send ``sig``."""
        proc = cli.start(*args, devices=8, log=log)
        _wait_for_step(dir_, step, proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            saving = _saving(dir_)
            if (when == "saving" and saving) or (when == "idle" and not saving and _steps(dir_)):
                break
            time.sleep(0.001)
        proc.send_signal(sig)
        rc = _finish(proc)
        leftovers = sorted(p.name for p in (dir_ / "checkpoints").iterdir() if "tmp" in p.name)
        events.append((sig.name, when, max(_logged_steps(dir_)), rc, _steps(dir_), leftovers))
        return rc

    assert run_until(rng.randint(3, 7), signal.SIGKILL, "saving") == -signal.SIGKILL
    step = max(_logged_steps(dir_)) + rng.randint(2, 4)
    assert run_until(step, signal.SIGTERM, rng.choice(["saving", "idle"])) == 0
    text = log.read_text()
    saved = [int(s) for s in re.findall(r"preempted: saved a checkpoint at step (\d+)", text)]
    assert len(saved) == 1 and saved[0] in _steps(dir_), (text[-3000:], events)
    step = max(_logged_steps(dir_)) + rng.randint(2, 4)
    assert run_until(step, signal.SIGKILL, "idle") == -signal.SIGKILL
    # The command line's main, as cli.in_process runs it, with its INFO log kept: parsing the
    # flags sets absl's log level.
    argv = command_line.parse_flags(["vdm_jax", *args])
    with caplog.at_level(logging.INFO, logger="absl"):
        command_line.main(argv)

    text = log.read_text() + caplog.text
    # Each start either resumed (from step n) or started afresh (0): when the first kill came
    # before any save had completed, the first restart starts over, as it should.
    starts = [
        int(n or 0) for n in re.findall(r"(?:starting a new run|resumed from step (\d+))", text)
    ]
    print(f"seed {seed}; (signal, when, last logged step, rc, checkpoints after, unfinished "
          f"saves): {events}; "
          f"each start began at step {starts}")  # fmt: skip
    assert len(starts) == 4 and starts[0] == 0 and starts[2] == saved[0], (starts, saved)
    assert starts == sorted(starts) and starts[3] > 0
    assert "Traceback" not in text
    assert "Unable to initialize backend 'tpu'" not in text  # the note is filtered out
    assert re.search(r"step 24: test bpd [0-9.]+", text), text[-3000:]  # evaluated at the end
    # Every step logs the trained objective beside the bound of the same pass (w < 1).
    assert re.search(r"step 24/24  loss [0-9.]+  bpd [0-9.]+ \(prior", text), text[-3000:]
    logged = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "loss" in r]
    assert len(logged) == 24 and all(r["loss"] < r["bpd"] for r in logged)
    whole, pieced = _restore(reference, ref_dir), _restore(config, dir_)
    assert whole.step == pieced.step == 24
    assert not np.allclose(whole.state.noise_histogram, 1.0)  # adapted, not the initial one
    # params, EMA, optimizer state, noise-level histogram, step
    _assert_bitwise_equal(pieced.state, whole.state)


@pytest.mark.slow
def test_sigterm_during_startup_exits_cleanly_and_saves_nothing_new(tmp_path, monkeypatch):
    """A preemption notice before the first step (e.g. while compiling) ends the run at once."""
    real_restore = checkpoint.Checkpointer.restore
    previous = signal.getsignal(signal.SIGTERM)

    def restore_and_get_preempted(self, *args, **kwargs):
        # Only with the watcher's handler in place: the default action would end pytest.
        assert signal.getsignal(signal.SIGTERM) is not previous
        os.kill(os.getpid(), signal.SIGTERM)
        return real_restore(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "restore", restore_and_get_preempted)
    state = trainer.train_and_evaluate(_config(), str(tmp_path))
    assert int(state.step) == 0
    assert _steps(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler was put back


def test_metrics_after_a_kill_mid_line_start_on_a_fresh_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "bpd": 5.0}\n{"step": 2, "bp')
    writer = run_files.MetricWriter(str(tmp_path))
    writer.write(3, {"bpd": 4.0})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 2, "bp' and json.loads(lines[2]) == {"step": 3, "bpd": 4.0}


# ----------------------------------------------------------------------------- damaged checkpoints


def _truncate_array_files(step_dir: Path) -> None:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        os.truncate(p, p.stat().st_size // 2)


@pytest.mark.slow
def test_damaged_latest_checkpoints_fall_back_to_the_last_good_one(tmp_path, caplog):
    config = _config(training__num_train_steps=6, training__keep_checkpoints=5)
    whole = trainer.train_and_evaluate(config, str(tmp_path / "a"))
    assert _steps(tmp_path / "a") == [2, 4, 6]

    # Newest with truncated array files, the one before without its state folder: step 2 wins.
    work = tmp_path / "b"
    shutil.copytree(tmp_path / "a", work)
    _truncate_array_files(work / "checkpoints" / "6")
    shutil.rmtree(work / "checkpoints" / "4" / "state")
    good = _snapshot(work / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING):
        resumed = trainer.train_and_evaluate(config, str(work))
    text = caplog.text
    assert "Checkpoint step 6" in text and "Checkpoint step 4" in text, text
    assert "cannot be restored" in text and "moved them aside" in text
    assert "Restored step 2 after damaged newer checkpoint(s)" in text
    assert _snapshot(work / "checkpoints" / "2") == good  # the good one untouched
    names = sorted(p.name for p in (work / "checkpoints").iterdir())
    assert [n for n in names if n.isdigit()] == ["2", "4", "6"]  # rewritten after resuming
    assert sum(n.startswith(("4.corrupt-", "6.corrupt-")) for n in names) == 2  # kept aside
    _assert_bitwise_equal(resumed, whole)  # and the redone steps gave the same bits

    # When every checkpoint is damaged nothing is deleted, moved or overwritten.
    broken = tmp_path / "c"
    shutil.copytree(tmp_path / "a", broken)
    for step in (2, 4, 6):
        _truncate_array_files(broken / "checkpoints" / str(step))
    before = _snapshot(broken)
    with pytest.raises(checkpoint.CheckpointCorruptError, match=r"step 6: .*step 2: .*Nothing"):
        trainer.train_and_evaluate(config, str(broken))
    assert _snapshot(broken) == before


# ----------------------------------------------------------------------------- divergence


def _exploding_optimizer(explode_after):
    """``build_optimizer`` for AdamW whose learning rate jumps to 1e30 after ``explode_after``
    updates: the parameters blow up in the next update and the loss overflows in the one
    after (a real divergence, nothing injected)."""
    import optax

    from vdm_jax.training import steps

    def learning_rate(count):
        return jnp.where(count < explode_after, 2e-3, 1e30)

    def build(config):
        tx = optax.adamw(
            learning_rate, b1=0.9, b2=0.99, weight_decay=0.0, mask=steps.weight_decay_mask
        )
        return tx, learning_rate

    return build


@pytest.mark.slow
def test_divergence_stops_at_the_first_bad_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    # Updates 1..4 normal, update 5 with lr 1e30 (parameters ~1e30), update 6 overflows. The
    # guard is read only at steps 4 and 8 (checkpoint/log), yet names step 6.
    monkeypatch.setattr(run_setup, "build_optimizer", _exploding_optimizer(4))
    config = _config(
        training__num_train_steps=12, training__log_every=8, training__checkpoint_every=4
    )
    with pytest.raises(trainer.TrainingDivergedError) as info:
        trainer.train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    assert message.startswith("training diverged at step 6: non-finite "), message
    assert re.search(r"\bbpd=(nan|inf)", message) and "grad_norm=nan" in message
    assert "the last good checkpoint, step 4, is intact" in message
    assert _steps(tmp_path) == [4]  # nothing of the diverged state
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))
    assert _logged_steps(tmp_path) == []  # the first log step (8) was not written
    restored = _restore(config, tmp_path)
    assert restored.step == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.state.params))


def _inject_nan_at(monkeypatch, bad_steps):
    """Make the updates that produce the given steps non-finite (loss, gradients, parameters)."""
    real = steps.make_train_step

    def make(model, optimizer, ema_decay, learning_rate_fn=None, **noise_levels):
        step_fn = real(model, optimizer, ema_decay, learning_rate_fn, **noise_levels)

        def poisoned(state, batch, key, **kwargs):
            new, metrics = step_fn(state, batch, key, **kwargs)
            nan = jnp.where(jnp.isin(new.step, jnp.asarray(bad_steps)), jnp.nan, 0.0)
            metrics = {
                **metrics,
                "bpd": metrics["bpd"] + nan,
                "diffusion_bpd": metrics["diffusion_bpd"] + nan,
                "grad_norm": metrics["grad_norm"] + nan,
            }
            return new.replace(params=jax.tree.map(lambda p: p + nan, new.params)), metrics

        return poisoned

    monkeypatch.setattr(trainer.steps, "make_train_step", make)


@pytest.mark.slow
def test_skip_nonfinite_updates_keeps_the_parameters_and_counts_skips(tmp_path, monkeypatch):
    # Steps 5, 6 bad (skipped: at most 2 in a row), then 9, 10, 11 bad (the third stops it).
    _inject_nan_at(monkeypatch, [5, 6, 9, 10, 11])
    config = _config(
        training__num_train_steps=16, training__log_every=4, training__checkpoint_every=2,
        training__keep_checkpoints=10, training__skip_nonfinite_updates=2,
    )  # fmt: skip
    with pytest.raises(trainer.TrainingDivergedError) as info:
        trainer.train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    assert message.startswith(
        "training diverged at step 11: 3 non-finite updates in a row (steps 9 to 11), more "
        "than training.skip_nonfinite_updates=2 allows; at step 11 non-finite bpd=nan, "
        "diffusion_bpd=nan, grad_norm=nan, params"
    ), message
    assert "the last good checkpoint, step 10, is intact" in message
    assert _steps(tmp_path) == [2, 4, 6, 8, 10]
    records = {r["step"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    assert records[4]["skipped_updates"] == 0 and records[8]["skipped_updates"] == 2
    at = {s: _restore(config, tmp_path, s).state for s in (4, 6, 8, 10)}
    # Steps 5 and 6 were skipped: the state at 6 is the state at 4 with the step moved on.
    assert int(at[6].step) == 6
    _assert_bitwise_equal(at[6].replace(step=at[4].step), at[4])
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(at[8].params), jax.tree.leaves(at[6].params), strict=True)]  # fmt: skip
    assert any(moved)  # 7 and 8 were applied
    _assert_bitwise_equal(at[10].replace(step=at[8].step), at[8])  # 9, 10 skipped as well


# ----------------------------------------------------------------------------- disk full


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_write = checkpoint.write_text
    failed = []

    def write_or_fail(path, text):
        if re.search(r"/6\.orbax-checkpoint-tmp", str(path)):
            failed.append(str(path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, text)

    monkeypatch.setattr(checkpoint, "write_text", write_or_fail)
    config = _config(
        training__num_train_steps=8, training__checkpoint_every=2, training__keep_checkpoints=1
    )
    with pytest.raises(checkpoint.CheckpointSaveError) as info:
        trainer.train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    assert failed and "the checkpoint for step 6" in message, message
    assert "No space left on device (ENOSPC)" in message
    assert "the checkpoints already complete are intact (latest: step 4)" in message
    assert _steps(tmp_path) == [4]  # keep_checkpoints=1, yet 4 survives the failed 6
    assert _restore(config, tmp_path).step == 4
    # Resuming over the unfinished folder and writing step 6 again: test_checkpoint.py
    # (test_failed_write_raises_save_error_and_keeps_the_previous_step), and the SIGKILL test
    # above restarts over unfinished writes every time.


# ----------------------------------------------------------------------------- bad input


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image_folder(root: Path, size=(4, 4), test_size=None) -> Path:
    """root/{train,test}/{a,b}/{0..3}.png: tiny grey images."""
    rng = np.random.default_rng(0)
    for split, (h, w) in (("train", size), ("test", test_size or size)):
        for cls in ("a", "b"):
            for i in range(4):
                _png(root / split / cls / f"{i}.png", rng.integers(0, 256, (h, w), np.uint8))
    return root


def _folder_config(root: Path, **overrides):
    return _config(data__name="folder", data__data_dir=str(root), **overrides)


def _no_images(tmp):
    (tmp / "imgs" / "train" / "a").mkdir(parents=True)
    (tmp / "imgs" / "test" / "a").mkdir(parents=True)
    return _folder_config(tmp / "imgs")


def _mixed_sizes(tmp):
    root = _image_folder(tmp / "imgs")
    _png(root / "train" / "b" / "9.png", np.zeros((5, 4), np.uint8))
    return _folder_config(root)


def _corrupt_file(tmp):
    root = _image_folder(tmp / "imgs")
    (root / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return _folder_config(root)


def _truncated_pixels(tmp):
    root = _image_folder(tmp / "imgs", size=(32, 32))
    path = root / "train" / "a" / "2.png"
    path.write_bytes(path.read_bytes()[:-200])  # the header reads, the pixels do not
    return _folder_config(root)


def _sixteen_bit(tmp):
    # Values up to 65535 do not fit the 256-value vocabulary of 8-bit images.
    root = _image_folder(tmp / "imgs")
    _png(root / "train" / "a" / "0.png", np.full((4, 4), 40000, np.uint16))
    return _folder_config(root)


def _no_test_split(tmp):
    root = _image_folder(tmp / "imgs")
    shutil.rmtree(root / "test")
    return _folder_config(root)


def _test_split_other_size(tmp):
    return _folder_config(_image_folder(tmp / "imgs", size=(4, 4), test_size=(6, 6)))


def _without_gamma_min(d):
    del d["model"]["gamma_min"]


def _typo(d):
    d["training"]["num_train_stepz"] = 3


def _float_steps(d):
    d["training"]["num_train_steps"] = 1e6


def _string_width(d):
    d["model"]["n_embd"] = "32"


def _int_for_bool(d):
    d["model"]["attention_everywhere"] = 1


def _float_exponents(d):
    d["model"]["fourier_exponents"] = (6.5, 7)


# (case, how to make the config (tmp_path -> config), the message it must raise)
CONFIG_AND_DATA_CASES = [
    ("negative batch size", lambda t: _config(training__batch_size=-16),
     r"training\.batch_size must be a positive integer, got -16"),
    ("batch not divisible by devices", lambda t: _config(
        training__batch_size=12, parallel__num_devices=-1),
     r"global batch size 12 is not divisible by the 8 devices"),
    ("more devices than exist", lambda t: _config(parallel__num_devices=99),
     r"num_devices must be in 1\.\.8, got 99"),
    ("float where an integer belongs", lambda t: _raw_config(_float_steps),
     r"training\.num_train_steps must be an integer, got 1000000\.0"),
    ("string where an integer belongs", lambda t: _raw_config(_string_width),
     r"model\.n_embd must be an integer, got '32'"),
    ("integer where a bool belongs", lambda t: _raw_config(_int_for_bool),
     r"model\.attention_everywhere must be True or False, got 1"),
    ("non-integer Fourier exponents", lambda t: _raw_config(_float_exponents),
     r"model\.fourier_exponents must be a tuple of integers, got \(6\.5, 7\)"),
    ("unknown field (a typo in a config file)", lambda t: _raw_config(_typo),
     r"unknown config field training\.num_train_stepz \(= 3\); did you mean "
     r"training\.num_train_steps\?"),
    ("missing field", lambda t: _raw_config(_without_gamma_min),
     r"config field model\.gamma_min is missing"),
    ("gamma_min >= gamma_max", lambda t: _config(model__gamma_min=6.0, model__gamma_max=-8.0),
     r"model\.gamma_min must be below model\.gamma_max, got gamma_min=6\.0, gamma_max=-8\.0"),
    ("gamma_min not finite", lambda t: _config(model__gamma_min=float("nan")),
     r"model\.gamma_min must be a finite number, got nan"),
    ("dropout rate >= 1", lambda t: _config(model__dropout_rate=1.5),
     r"model\.dropout_rate must be a number in \[0, 1\), got 1\.5"),
    ("fewer classes than the data", lambda t: _config(model__num_classes=5),
     r"model\.num_classes=5 is smaller than the data's 10 classes"),
    ("unknown schedule", lambda t: _config(model__schedule="cosine"),
     r"model\.schedule must be one of 'fixed_linear', 'learned_linear', 'monotonic'.*, got "
     r"'cosine'"),
    ("variance gradient in discrete time", lambda t: _config(
        model__variance_gradient=True, model__timesteps=10),
     r"model\.variance_gradient=True needs the continuous-time loss \(model\.timesteps=0\)"),
    ("unknown weighting", lambda t: _config(objective__weighting="snr"),
     r"objective\.weighting must be one of 'elbo', 'sigmoid'.*, got 'snr'"),
    ("weighted objective in discrete time", lambda t: _config(
        objective__weighting="sigmoid", model__timesteps=10),
     r"objective\.weighting='sigmoid' with objective\.noise_levels='schedule' needs the "
     r"continuous-time loss"),
    ("adaptive noise levels with the variance gradient", lambda t: _config(
        objective__noise_levels="adaptive", model__variance_gradient=True),
     r"objective\.noise_levels='adaptive' draws the noise levels without the schedule's shape"),
    ("noise-level floor of 0", lambda t: _config(objective__noise_floor=0.0),
     r"objective\.noise_floor must be a number in \(0, 1\], got 0\.0"),
    ("unknown parameterization", lambda t: _config(model__parameterization="score"),
     r"model\.parameterization must be one of 'eps', 'x', 'v', got 'score'"),
    ("negative learning rate", lambda t: _config(optimizer__learning_rate=-1e-3),
     r"optimizer\.learning_rate must be a non-negative finite number, got -0\.001"),
    ("EMA decay of 1", lambda t: _config(optimizer__ema_decay=1.0),
     r"optimizer\.ema_decay must be a number in \[0, 1\), got 1\.0"),
    ("negative skip count", lambda t: _config(training__skip_nonfinite_updates=-1),
     r"training\.skip_nonfinite_updates must be a non-negative integer, got -1"),
    ("unknown parallel mode", lambda t: _config(parallel__mode="xmap"),
     r"parallel\.mode must be one of 'jit', 'pmap', got 'xmap'"),
    ("unknown evaluation split", lambda t: _config(eval__split="validation"),
     r"digits_source: split must be one of \('train', 'test'\), got 'validation'"),
    ("empty evaluation split name", lambda t: _config(eval__split=""),
     r"eval\.split must be a non-empty string, got ''"),
    ("unknown decoding", lambda t: _config(sampling__decode="argmx"),
     r"sampling\.decode must be one of 'argmax', 'sample', got 'argmx'"),
    ("negative seed", lambda t: _config(seed=-1),
     r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    ("unknown data set", lambda t: _config(data__name="svhn"),
     r"data\.name must be one of 'digits', .*got 'svhn'"),
    ("folder data without a folder", lambda t: _config(data__name="folder"),
     r"data\.data_dir must name the image folder"),
    ("tfds data_dir missing", lambda t: _config(
        data__name="cifar10", data__data_dir=str(t / "no_tfds")),
     r"tfds_source: data_dir '.*no_tfds' does not exist"),
    ("image folder missing", lambda t: _folder_config(t / "no_images"),
     r"folder_source: image folder '.*no_images' does not exist"),
    ("image folder empty", _no_images, r"folder_source: no image files"),
    ("images of two sizes", _mixed_sizes,
     r"folder_source: images have different sizes: .* is 4x4 \(WxH\) but .*9\.png' is 4x5"),
    ("corrupt image file", _corrupt_file, r"cannot read image file '.*1\.png'"),
    ("16-bit image (values beyond the vocabulary)", _sixteen_bit,
     r"image file '.*0\.png' has mode 'I;16'; only 8-bit images are supported"),
    ("test split missing", _no_test_split, r"split folder '.*test' does not exist"),
    ("test images of another size", _test_split_other_size,
     r"data: the 'test' split's images have shape \(6, 6, 1\) but the training split's have "
     r"\(4, 4, 1\)"),
    ("augmentation of images that are not square", lambda t: _folder_config(
        _image_folder(t / "imgs", size=(4, 6)), data__augment=True),
     r"data\.augment=True rotates images by 90 degrees, but the data's are 4x6"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make_config", "message"),
    [pytest.param(make, msg, id=case) for case, make, msg in CONFIG_AND_DATA_CASES],
)
def test_bad_config_or_data_stops_before_any_file(tmp_path, make_config, message):
    config = make_config(tmp_path)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()  # not even the workdir was created


@pytest.mark.slow
def test_image_whose_pixels_are_truncated_fails_at_the_first_batch(tmp_path):
    """Headers are checked up front; pixels are read with the first batch, before any
    metrics, config or checkpoint file is written."""
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"cannot decode image file '.*2\.png'.*truncated"):
        trainer.train_and_evaluate(_truncated_pixels(tmp_path), str(workdir))
    assert [p.name for p in workdir.iterdir()] == ["checkpoints"]  # no metrics, no config
    assert not any((workdir / "checkpoints").iterdir())


def test_pixel_values_beyond_the_vocabulary_are_rejected():
    images = np.full((2, 4, 4), 17, np.uint8)
    with pytest.raises(ValueError, match="pixel value 17 is not below vocab_size=17"):
        sources.array_source(images, vocab_size=17)


def _make_read_only(path: Path) -> bool:
    """Make ``path`` unwritable, also for root (chattr +i); False if this system can't."""
    path.chmod(0o500)
    if not os.access(path, os.W_OK):
        return True
    try:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        path.chmod(0o700)
        return False
    return True


def _undo_read_only(path: Path) -> None:
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o700)


def _checkpoint_of(tmp, config, state=None) -> Path:
    """A workdir holding one checkpoint (step 2) written with ``config``, plus the files a run
    leaves, so that the test can see that none of them changes."""
    workdir = tmp / "run"
    state = state if state is not None else {"w": jnp.zeros((3,))}
    with checkpoint.Checkpointer(
        workdir / "checkpoints", save_interval_steps=1, max_to_keep=2
    ) as ckpt:
        ckpt.save(2, state, data_state=None, config=config.to_dict())
    (workdir / "metrics.jsonl").write_text('{"step": 2, "bpd": 5.0}\n')
    (workdir / "config.json").write_text(config.to_json())
    return workdir


@pytest.mark.slow
def test_bad_workdirs_stop_and_change_nothing(tmp_path):
    config = _config()
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [
        ("empty workdir path", "", ValueError, r"workdir must be a folder path, got ''"),
        ("workdir is a file", a_file, ValueError, rf"workdir {a_file} exists and is not a folder"),
        ("workdir under a file", a_file / "run", ValueError,
         rf"cannot create workdir {a_file}/run: {a_file} is a file, not a folder"),
    ]  # fmt: skip
    blocked = tmp_path / "blocked" / "run"
    blocked.mkdir(parents=True)
    (blocked / "checkpoints").write_text("a file where the checkpoints belong")
    cases += [
        ("checkpoint of another model", _checkpoint_of(tmp_path / "m", _config(model__n_embd=32)),
         ValueError, r"checkpoint at .*/2 was written with model\.n_embd=32 \(this run has 16\)"),
        ("checkpoint of another data set",
         _checkpoint_of(tmp_path / "d", _config(data__name="cifar10")),
         ValueError, r"data\.name='cifar10' \(this run has 'digits'\)"),
        # The same config but another pytree: not taken for damage, nothing moved aside.
        ("checkpoint of another program", _checkpoint_of(tmp_path / "p", config),
         checkpoint.CheckpointCorruptError,
         r"No checkpoint in .* could be restored \(step 2: .*Nothing was deleted"),
        ("checkpoints folder is a file", blocked,
         ValueError, r"Checkpoint directory .*checkpoints exists and is not a directory"),
    ]  # fmt: skip
    for case, workdir, error, message in cases:
        before = _snapshot(tmp_path)
        with pytest.raises(error, match=message):
            trainer.train_and_evaluate(config, str(workdir))
        assert _snapshot(tmp_path) == before, case


@pytest.mark.slow
def test_training_data_changed_since_the_checkpoint(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    config = _folder_config(
        root, training__batch_size=4, eval__batch_size=8, training__num_train_steps=2,
        sampling__num_samples=1, sampling__sampling_steps=1,
    )  # fmt: skip
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(config, str(workdir))
    config.training.num_train_steps = 4
    _png(root / "train" / "a" / "7.png", np.zeros((4, 4), np.uint8))  # one more image
    before = _snapshot(workdir)
    message = (
        r"cannot resume the input pipeline from the checkpoint at step 2 in .*: did the "
        r"training data change since it was written\? .*num_records=8"
    )
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(config, str(workdir))
    assert _snapshot(workdir) == before


def test_read_only_workdir(tmp_path):
    workdir = _checkpoint_of(tmp_path, _config())
    if not _make_read_only(workdir):
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        before = _snapshot(workdir)
        with pytest.raises(ValueError, match=rf"workdir {workdir} is not writable"):
            trainer.train_and_evaluate(_config(), str(workdir))
        assert _snapshot(workdir) == before
    finally:
        _undo_read_only(workdir)


def test_eval_and_sample_need_a_trained_workdir(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist: train first"):
        trainer.evaluate(_config(), str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no checkpoint in .*: train first"):
        trainer.sample(_config(), str(tmp_path / "empty"))


def test_every_shipped_config_passes_the_checks():
    from vdm_jax.configs import base, cifar10, imagenet32, imagenet64, mnist

    for module in (digits, cifar10, mnist, imagenet32, imagenet64):
        for variant in ("", "smoke"):
            config_schema.check_config(module.get_config(variant))
    fields = set(config_schema.flatten(base.get_config().to_dict()))
    assert fields == set(config_schema.field_names())
    assert set(config_schema.resume_keys()) <= fields
    descriptions = config_schema.field_meanings()  # what --mode=show_config prints
    assert set(descriptions) == fields and all(descriptions.values())


def _cli_case_files(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """(flags, expected error) for each command-line case."""
    typed_file = tmp / "typed_config.py"  # ml_collections refuses a float for an int field
    typed_file.write_text(
        "from vdm_jax.configs import digits\n\n"
        "def get_config():\n"
        "    config = digits.get_config('smoke')\n"
        "    config.training.num_train_steps = 1e6\n"
        "    return config\n"
    )
    dict_file = tmp / "dict_config.py"  # a config built from a plain dict takes any type
    dict_file.write_text(
        "import ml_collections\n"
        "from vdm_jax.configs import digits\n\n"
        "def get_config():\n"
        "    d = digits.get_config('smoke').to_dict()\n"
        "    d['training']['num_train_steps'] = 1e6\n"
        "    return ml_collections.ConfigDict(d)\n"
    )
    a_file = tmp / "a_file"
    a_file.write_text("x")
    folder = _corrupt_file(tmp).data.data_dir
    w = tmp / "run"
    return {
        "bad value": (_flags(w, **{"model.gamma_min": 7.0}),
                      r"model\.gamma_min must be below model\.gamma_max"),
        "unknown variant": (["--config=digits:tiny", f"--workdir={w}"],
                            r"unknown config variant 'tiny'; known: \['smoke'\]"),
        "missing config file": ([f"--config={tmp}/nowhere.py", f"--workdir={w}"],
                                r"--config=.*nowhere\.py: no config file .*nowhere\.py"),
        "misspelt bundled config": (["--config=digit:smoke", f"--workdir={w}"],
                                    r"no bundled config 'digit'; did you mean "
                                    r"--config=digits:smoke\?"),
        "misspelt field": (_flags(w, **{"training.num_train_step": 10}),
                           r"--config\.training\.num_train_step: the config has no field "
                           r"'training\.num_train_step'; did you mean "
                           r"--config\.training\.num_train_steps\?"),
        "misspelt section": (_flags(w, **{"trainng.x": 1}),
                             r"no section or field 'trainng\.x'; did you mean the section "
                             r"'training'\?"),
        "wrong type": (_flags(w, **{"training.num_train_steps": "1e6"}),
                       r"training\.num_train_steps must be an integer, got '1e6'"),
        "a value where a section is": (_flags(w, training=5),
                                       r"--config\.training: training is a section of the "
                                       r"config, not a field"),
        "float for an int in a config file": (
            [f"--config={typed_file}", f"--workdir={w}"],
            r"1000000\.0 is of original type <class 'float'> and cannot be casted"),
        "float for an int in a dict config": (
            [f"--config={dict_file}", f"--workdir={w}"],
            r"training\.num_train_steps must be an integer, got 1000000\.0"),
        "workdir is a file": (_flags(a_file), r"workdir .*a_file exists and is not a folder"),
        "corrupt image": (_flags(w, **{"data.name": "folder", "data.data_dir": folder}),
                          r"cannot read image file '.*1\.png'"),
    }  # fmt: skip


# Run as processes: an error while the flags parse, before jax starts, and one that the
# training layer raises; the other cases run the same ``main`` in the test's process.
IN_A_PROCESS = ("misspelt field", "corrupt image")


@pytest.mark.slow
def test_command_line_user_errors_print_one_line_and_exit_1(tmp_path, cli, capsys):
    cases = _cli_case_files(tmp_path)
    before = _snapshot(tmp_path)
    procs = {name: cli.start(*cases[name][0]) for name in IN_A_PROCESS}
    for name, (args, message) in cases.items():
        if name in procs:
            continue
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            cli.in_process(*args)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert exited.value.code == 1, (name, err[-2000:])
        assert len(errors) == 1 and re.search(message, err), (name, err[-2000:])
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=240)  # stdout and stderr together
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 1, (name, out[-2000:])
        assert len(errors) == 1 and re.search(cases[name][1], out), (name, out[-2000:])
        assert "Traceback" not in out, (name, out[-3000:])
    assert _snapshot(tmp_path) == before  # no workdir created, nothing written
