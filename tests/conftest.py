"""Test set-up: 8 fake CPU devices, compile-light XLA settings, a persistent compilation cache,
a temporary feature cache, a shared smoke run.

XLA reads ``XLA_FLAGS`` once, when jax first initialises a backend, so this must run before any
test module imports jax.

The compilation cache is ``JAX_COMPILATION_CACHE_DIR`` if set, else a temporary folder made
here and removed at the end. It goes into the environment before pytest-xdist starts its
workers, so the workers and every command-line subprocess of the run share one cache: a
program compiled once (the digits smoke model, its eval and sampling steps) is read back
everywhere else.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: XLA flags of every test process and command-line subprocess: XLA's older CPU code emitters,
#: which compile the tests' tiny programs in about two thirds of the time of its fusion
#: emitters (the same functions, rounded as that emitter rounds). A result to the bit that
#: depends on how XLA rounds is tested with the default emitters, in a subprocess
#: (``cli.env(compile_light=False)``): XLA reads its flags once per process.
COMPILE_LIGHT = "--xla_cpu_use_fusion_emitters=false"

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_cpu_use_fusion_emitters" not in _flags:
    _flags += " " + COMPILE_LIGHT
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_own_cache = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _own_cache = tempfile.mkdtemp(prefix="vdm_jax_tests_compilation_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _own_cache

# Tiny models compile for far longer than they run: XLA's optimisations off halves most tests'
# time. The environment carries it into the command-line subprocesses; a test of what the
# optimisations do (memory, fusion) turns them back on with the ``optimized`` fixture.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# Every program goes into the shared cache, also in the command-line subprocesses (which read
# the environment): compiled without optimisations most take well under a second, and the
# same few programs (the digits smoke model's steps) compile in many processes.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


#: The checkout under test: command-line subprocesses import its ``vdm_jax``.
REPO = Path(__file__).resolve().parents[1]


class CommandLine:
    """The command line ``python -m vdm_jax`` as a user runs it, for tests.

    A subprocess (:meth:`run`, :meth:`start`) imports this checkout's ``vdm_jax``, sees
    ``devices`` CPU devices (default 1, the machine's own, as a user's command line does; the
    test process has 8 fake ones) and shares the session's compilation cache, so a program
    compiled by one test's command is read back by the next. Use a subprocess only where the
    process is what is tested (exit codes, signals, several processes, a fresh interpreter);
    :meth:`in_process` runs the same ``main`` in the test's process, without paying for a
    Python start and a cold in-memory cache."""

    def env(self, devices: int = 1, compile_light: bool = True, **extra: str) -> dict[str, str]:
        """The environment of a command-line subprocess; ``extra`` variables added.
        ``compile_light=False``: XLA's default code emitters, for a test of a result to the
        bit that depends on how XLA rounds (see ``COMPILE_LIGHT``)."""
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        if compile_light:
            env["XLA_FLAGS"] += " " + COMPILE_LIGHT
        env.update(extra)
        return env

    def start(self, *args: str, devices: int = 1, cwd=REPO, log=None, **extra):
        """``python -m vdm_jax ARGS`` started (a :class:`subprocess.Popen`); its output into
        the file ``log`` (appended), else a pipe (stdout and stderr together, text).
        ``extra``: keywords of :meth:`env`."""
        command = [sys.executable, "-m", "vdm_jax", *args]
        env = self.env(devices, **extra)
        if log is None:
            return subprocess.Popen(
                command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        with open(log, "ab") as out:
            return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def run(self, *args: str, devices: int = 1, cwd=REPO, timeout: float = 600, **extra):
        """``python -m vdm_jax ARGS`` run to its end: a :class:`subprocess.CompletedProcess`
        with ``stdout`` and ``stderr`` as text (the test checks ``returncode``). ``extra``:
        keywords of :meth:`env`."""
        return subprocess.run(
            [sys.executable, "-m", "vdm_jax", *args], cwd=cwd, env=self.env(devices, **extra),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def in_process(self, *args: str) -> None:
        """The command line's ``main`` on ``ARGS`` in this process (its 8 fake devices; pass
        ``--config.parallel.num_devices`` to use fewer). Output goes to the test's captured
        stdout/stderr (``capsys``); a user error raises ``SystemExit(1)`` after printing its
        ``error:`` line."""
        from vdm_jax import cli as command_line

        argv = command_line.parse_flags(["vdm_jax", *args])
        command_line.main(argv)


@pytest.fixture(scope="session")
def cli() -> CommandLine:
    """The command line, run as a subprocess or in process (:class:`CommandLine`)."""
    return CommandLine()


def pytest_collection_modifyitems(config, items):
    """The slow tests first: with ``-n 2`` the long ones then start early and the short ones
    fill the gaps, instead of one worker finishing a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
    if _own_cache:  # made by this process (the controller under xdist): the last to end
        shutil.rmtree(_own_cache, ignore_errors=True)


@pytest.fixture
def optimized():
    """XLA's optimisations on for this test, as users run: for a test whose tolerance is
    float rounding as the optimised program rounds."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def init_state():
    """:func:`vdm_jax.training.steps.init_state` under jit (model and optimizer static): op by
    op, initialising a model compiles hundreds of single operations."""
    from vdm_jax.training import steps

    return jax.jit(steps.init_state, static_argnums=(0, 1), static_argnames="noise_bins")


@pytest.fixture(scope="session")
def digits_smoke_run(tmp_path_factory):
    """``(workdir, final state)`` of one ``digits:smoke`` run on one device (4 steps,
    checkpoints at 2 and 4), trained once per test process. Tests only read it.

    One device: on 8 it takes half as long again (the sharded programs compile and run on 2
    cores), and training over several devices is tested where the devices are the point
    (``test_train.py``, ``test_multihost.py``)."""
    from vdm_jax.configs import digits
    from vdm_jax.training import trainer

    workdir = tmp_path_factory.mktemp("digits_smoke")
    config = digits.get_config("smoke")
    config.parallel.num_devices = 1
    return workdir, trainer.train_and_evaluate(config, str(workdir))


@pytest.fixture
def digits_smoke_copy(digits_smoke_run, tmp_path):
    """A copy of the ``digits_smoke_run`` workdir of this test's own, for a test that writes
    into a trained run (a report, a refused resume) without training one."""
    workdir = tmp_path / "digits_smoke"
    shutil.copytree(digits_smoke_run[0], workdir)
    return workdir


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(tmp_path_factory):
    """Feature extractors (the digits classifier of the Frechet distance) cache their weights
    in this session's temporary folder, not in the user's cache, also in subprocesses."""
    os.environ.setdefault("VDM_JAX_CACHE", str(tmp_path_factory.mktemp("vdm_jax_cache")))
