"""What the studies' scripts share (and the benchmarks reuse): reading a study's own
``config.py`` and a record of the machine that ran a script."""

from __future__ import annotations

import importlib.util
import os
import time
from typing import TYPE_CHECKING, Any

import jax

if TYPE_CHECKING:  # ml_collections is absent where only the benchmarks run
    import ml_collections

HERE = os.path.dirname(os.path.abspath(__file__))


def load_config(study: str, arg: str = "") -> ml_collections.ConfigDict:
    """``experiments/<study>/config.py``'s ``get_config(arg)``, as ``--config=PATH:ARG`` reads
    it on the command line."""
    path = os.path.join(HERE, study, "config.py")
    spec = importlib.util.spec_from_file_location(f"experiments_{study}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def environment() -> dict[str, Any]:
    """What ran a script: backend, devices, jax version, XLA flags and the date."""
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": time.strftime("%Y-%m-%d"),
    }
