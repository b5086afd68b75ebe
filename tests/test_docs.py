"""The documentation: the API reference builds without a warning and covers the public names,
the README's Python snippets run as doctests, and the tutorial runs."""

import doctest
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import vdm_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")


def _env(**extra):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=REPO, **extra)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user has
    return env


def _public_modules():
    """Every module of the package whose name has no leading underscore."""
    names = ["vdm_jax"]
    for info in pkgutil.walk_packages(vdm_jax.__path__, "vdm_jax."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


@pytest.mark.slow
def test_api_reference_builds_with_warnings_as_errors_and_covers_the_public_names(tmp_path):
    out = tmp_path / "html"
    built = subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html",
         DOCS, str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-5000:]
    assert not built.stderr.strip(), built.stderr[-5000:]
    pages = "".join(
        open(os.path.join(d, f), encoding="utf-8").read()
        for d, _, files in os.walk(out)
        for f in files
        if f.endswith(".html")
    )
    # Every module has a section, and every name of the curated namespace an entry.
    sources = "".join(
        open(os.path.join(d, f)).read()
        for d, _, files in os.walk(DOCS)
        for f in files
        if f.endswith(".rst")
    )
    documented = set(re.findall(r"^\.\. automodule:: (\S+)", sources, re.M))
    assert set(_public_modules()) <= documented, set(_public_modules()) - documented
    missing = []
    for name in vdm_jax.__all__:
        obj = getattr(vdm_jax, name)
        if inspect.ismodule(obj):
            anchor = f'id="module-{obj.__name__}"'
        else:
            anchor = f'id="{obj.__module__}.{obj.__qualname__}"'
        if anchor not in pages:
            missing.append(name)
    assert not missing, f"public names without an API entry: {missing}"


def test_every_public_name_has_a_docstring():
    undocumented = []
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        if not (module.__doc__ or "").strip():
            undocumented.append(module_name)
        for name in getattr(module, "__all__", []):
            if not (getattr(module, name).__doc__ or "").strip():
                undocumented.append(f"{module_name}.{name}")
    assert not undocumented


def _readme_python_blocks():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


@pytest.mark.slow
def test_readme_python_snippets_run_as_doctests():
    blocks = _readme_python_blocks()
    assert blocks, "the README has no Python snippet"
    # Each Python snippet is a doctest, so none of them can go stale unnoticed.
    assert all(">>> " in block for block in blocks)
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs: dict = {}  # shared: a later snippet may use the names of an earlier one
    report = []
    for i, block in enumerate(blocks):
        test = parser.get_doctest(block, globs, f"README.md python block {i + 1}", "README.md", 0)
        runner.run(test, out=report.append, clear_globs=False)
        globs = test.globs  # a DocTest works on a copy
    assert runner.failures == 0, "".join(report)
    assert runner.tries >= 10


@pytest.mark.slow
def test_tutorial_runs_and_draws_its_figures(tmp_path):
    # A quarter of the tutorial's 4000 steps reach a bound in the range checked below (3.33
    # bits/dim on the 2-core machine). It trains long enough for running to outweigh
    # compiling: optimised, 30% faster.
    env = _env(VDM_TUTORIAL_OUT=str(tmp_path), VDM_TUTORIAL_STEPS="1000")
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
    ran = subprocess.run(
        [sys.executable, os.path.join(DOCS, "tutorial.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-5000:]
    found = re.search(r"test bound ([0-9.]+) bits/dim", ran.stdout)
    assert found and 1.0 < float(found.group(1)) < 4.0, ran.stdout[-2000:]
    for name in ("schedule_and_loss.png", "samples.png"):
        image = np.asarray(Image.open(tmp_path / name).convert("L"), np.float64)
        assert image.std() > 5 and len(np.unique(image)) > 20, name
