"""Test set-up: 8 fake CPU devices, a persistent compilation cache, a temporary feature cache,
a shared smoke run.

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
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
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
def digits_smoke_run(tmp_path_factory):
    """``(workdir, final state)`` of one ``digits:smoke`` run (4 steps, checkpoints at 2 and 4),
    trained once per test process. Tests only read it."""
    from vdm_jax.configs import digits
    from vdm_jax.training import trainer

    workdir = tmp_path_factory.mktemp("digits_smoke")
    return workdir, trainer.train_and_evaluate(digits.get_config("smoke"), str(workdir))


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
