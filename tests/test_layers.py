"""The package's architecture: each layer imports only the layers above it, and every module
is small, declares its public names and uses no private name of another module."""

import ast
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import vdm_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vdm_jax")
# Not maths or models: the command line and what reads other codes' checkpoints or configs.
OUTSIDE = {"cli", "__main__", "pretrained", "configs", "training"}
FORBIDDEN = ("vdm_jax.training", "orbax", "grain", "tensorflow_datasets")
MAX_LINES = 600

# What each layer may not import (layer 1 maths <- 2 models <- 3 training <- 4 cli, configs).
LAYERS = {
    "maths": ("vdm_jax.models", "vdm_jax.pretrained", "vdm_jax.training", "vdm_jax.cli",
              "vdm_jax.configs"),
    "models": ("vdm_jax.pretrained", "vdm_jax.training", "vdm_jax.cli", "vdm_jax.configs"),
    "pretrained": ("vdm_jax.training", "vdm_jax.cli", "vdm_jax.configs"),
    "training": ("vdm_jax.cli", "vdm_jax.configs"),
    "errors": ("vdm_jax.",),
}  # fmt: skip


def _modules():
    """{dotted name without 'vdm_jax.': path} of every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, PACKAGE)[: -len(".py")].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__").removesuffix("__init__")] = path
    return found


def _imports(module: str, path: str):
    """(imported module, names imported from it) of every import in the file, functions'
    bodies included; relative imports resolved against ``module``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    package = ("vdm_jax." + module).rsplit(".", 1)[0] if module else "vdm_jax"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            yield base, [alias.name for alias in node.names]


def test_every_layer_imports_only_the_layers_above_it():
    modules = _modules()
    assert {"maths.diffusion", "models.vdm", "training.trainer", "cli"} <= set(modules)
    bad = []
    for module, path in sorted(modules.items()):
        layer = module.split(".")[0] or "vdm_jax"
        for imported, names in _imports(module, path):
            targets = [f"{imported}.{n}" for n in names] or [imported]
            for target in targets:
                if target.startswith(LAYERS.get(layer, ())):
                    bad.append(f"{module} imports {target}")
    assert not bad, bad


def test_every_module_is_short_and_declares_its_public_names():
    long, without_all = [], []
    for module, path in sorted(_modules().items()):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.count("\n") > MAX_LINES:
            long.append(f"{module}: {text.count(chr(10))} lines")
        tree = ast.parse(text)
        declared = any(
            isinstance(node, (ast.Assign, ast.AnnAssign))
            and any(
                isinstance(t, ast.Name) and t.id == "__all__"
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            )
            for node in tree.body
        )
        if not declared:
            without_all.append(module)
    assert not long, long
    assert not without_all, without_all


def test_no_module_uses_a_private_name_of_another():
    modules = _modules()
    bad = []
    for module, path in sorted(modules.items()):
        own = "vdm_jax." + module if module else "vdm_jax"
        imported_modules = {}
        for imported, names in _imports(module, path):
            if not imported.startswith("vdm_jax") or imported == own:
                continue
            for name in names:
                if name.startswith("_"):
                    bad.append(f"{module}: from {imported} import {name}")
                elif f"{imported}.{name}".removeprefix("vdm_jax.") in modules:
                    imported_modules[name] = imported
        # module._private through a module imported by name (from vdm_jax.x import y; y._z).
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in imported_modules
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{module}: {node.value.id}.{node.attr}")
    assert not bad, bad


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
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {name: [] for name in names}, found
