"""What the studies' scripts share: reading a study's own ``config.py``."""

from __future__ import annotations

import importlib.util
import os

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
