"""The maths and models import nothing of the training system."""

import os
import pkgutil
import subprocess
import sys

import pytest

import vdm_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not maths or models: the command line and what reads other codes' checkpoints or configs.
OUTSIDE = {"cli", "__main__", "pretrained", "configs", "training"}
FORBIDDEN = ("vdm_jax.training", "orbax", "grain", "tensorflow_datasets")


@pytest.mark.slow
def test_maths_and_model_modules_import_no_training_system():
    names = sorted(
        m.name.removeprefix("vdm_jax.")
        for m in pkgutil.walk_packages(vdm_jax.__path__, "vdm_jax.")
        if m.name.removeprefix("vdm_jax.").split(".")[0] not in OUTSIDE
    )
    assert {"maths.diffusion", "maths.losses", "models.vdm", "models.unet"} <= set(names)
    script = (
        "import importlib, json, sys\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "found = {}\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module('vdm_jax.' + name)\n"
        "    found[name] = sorted(m for m in sys.modules if m.startswith(forbidden))\n"
        "print(json.dumps(found))\n"
    )
    # The package itself first, then each module: all in one process, so each module's
    # entry lists what it and the modules before it pulled in.
    proc = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    import json

    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {name: [] for name in names}, found
