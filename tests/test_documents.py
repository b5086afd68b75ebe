"""The documents stay true: the command lines that the README, BENCHMARKS.md, CONTRIBUTING.md
and the docs pages show name flags, config fields and bundled configs that exist, the
``vdm_jax`` names they mention import, the files they point to are in the repository, and the
TPU launcher stops the process it starts. Nothing here trains or starts a process."""

import importlib
import importlib.util
import os
import re

from absl import flags
from ml_collections import config_dict

import vdm_jax.cli  # noqa: F401  (defines the command line's flags)
from vdm_jax.configs import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = [
    "README.md",
    "BENCHMARKS.md",
    "CONTRIBUTING.md",
    *sorted(
        os.path.relpath(os.path.join(folder, name), REPO)
        for folder, _, names in os.walk(os.path.join(REPO, "docs"))
        for name in names
        if name.endswith(".rst")
    ),
]
# Folders whose files a document may name by their path; each named file must exist (but
# the docs' build output, docs/_build).
CHECKED_FOLDERS = ("vdm_jax/", "tests/", "benchmarks/", "docs/", "tools/", "experiments/")
# Placeholders of the documents, not files: a config file of the reader's own.
PLACEHOLDER_PATHS = ("path/to/",)


def _read(name: str) -> str:
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def _code_blocks(name: str) -> list[str]:
    """The code blocks of a Markdown file (fenced) or a reStructuredText page (``.. code-block::``
    and ``::`` literal blocks), continuation lines joined."""
    text = _read(name)
    if name.endswith(".md"):
        blocks = re.findall(r"^\s*```[a-z]*\n(.*?)^\s*```", text, re.M | re.S)
    else:
        blocks = [
            m.group(2)
            for m in re.finditer(r"(::|\.\. code-block:: \w+)\n\n((?:(?:   .*)?\n)+)", text)
        ]
    return [re.sub(r"\\\n\s*", " ", block) for block in blocks]


def _command_lines() -> list[tuple[str, str]]:
    """(document, line) for every command line of ``python -m vdm_jax`` or ``vdm-jax`` in a
    code block."""
    found = []
    for name in DOCUMENTS:
        for block in _code_blocks(name):
            for line in block.splitlines():
                command = line.split("#")[0].strip()
                if re.search(r"(python3? -m vdm_jax|^vdm-jax)\b", command):
                    found.append((name, command))
    return found


def _flatten(config, prefix=""):
    names = set()
    for key, value in config.items():
        names.add(prefix + key)
        if isinstance(value, config_dict.ConfigDict):
            names |= _flatten(value, f"{prefix}{key}.")
    return names


def test_the_documents_show_command_lines():
    documents = {name for name, _ in _command_lines()}
    assert {"README.md", "BENCHMARKS.md", "docs/running.rst"} <= documents, documents


def test_every_flag_and_config_field_of_a_command_line_exists():
    fields = _flatten(base.get_config())
    problems = []
    for name, line in _command_lines():
        command = line.split("-m vdm_jax", 1)[-1] if "-m vdm_jax" in line else line
        for flag, value in re.findall(r"(?:^|\s)--?(?:no)?([\w.]+)(?:=(\S*))?", command):
            if flag.startswith("config."):
                if flag[len("config.") :] not in fields:
                    problems.append(f"{name}: {line}: no config field {flag[7:]!r}")
            elif flag not in flags.FLAGS:
                problems.append(f"{name}: {line}: no flag --{flag}")
            elif flag == "mode" and value not in flags.FLAGS["mode"].parser.enum_values:
                problems.append(f"{name}: {line}: no mode {value!r}")
    assert not problems, "\n".join(problems)


def _load_config(value: str):
    """The config that ``--config=VALUE`` names: a bundled config ``NAME[:ARG]`` (a module of
    :mod:`vdm_jax.configs`) or a config file ``PATH.py[:ARG]`` of the repository."""
    name, _, arg = value.partition(":")
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("document_config", os.path.join(REPO, name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(f"vdm_jax.configs.{name}")
    return module.get_config(arg) if arg else module.get_config()


def test_every_config_named_on_a_command_line_loads():
    values = {
        value
        for _, line in _command_lines()
        for value in re.findall(r"--config=(\S+)", line)
        if not value.startswith(("run:", *PLACEHOLDER_PATHS))
    }
    assert "digits" in values, values
    for value in sorted(values):
        config = _load_config(value)
        assert set(config.keys()) == set(base.get_config().keys()), value


def _named(name: str) -> object:
    """The object that the dotted name ``vdm_jax.a.b.c`` denotes: the longest prefix that
    imports as a module, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(name)


def test_every_vdm_jax_name_of_the_documents_imports():
    problems = []
    for name in DOCUMENTS:
        text = _read(name)
        # A name followed by "(" may be a call with arguments; the name itself must exist.
        for dotted in sorted(set(re.findall(r"\bvdm_jax(?:\.[A-Za-z_]\w*)+", text))):
            try:
                _named(dotted)
            except (ImportError, AttributeError) as error:
                problems.append(f"{name}: {dotted}: {error}")
    assert not problems, "\n".join(problems)


def test_every_file_a_document_names_exists():
    pattern = "|".join(re.escape(folder) for folder in CHECKED_FOLDERS)
    problems = []
    for name in DOCUMENTS:
        for path in sorted(set(re.findall(rf"(?<![\w/.])(?:{pattern})[\w./-]*\w/?", _read(name)))):
            if "_build" not in path and not os.path.exists(os.path.join(REPO, path)):
                problems.append(f"{name}: {path}")
    assert not problems, "\n".join(problems)


def _launcher_case(script: str, case: str) -> str:
    found = re.search(rf"^  {case}\)\n(.*?)^    ;;", script, re.M | re.S)
    assert found, case
    return re.sub(r"\\\n\s*", " ", found.group(1))


def test_the_tpu_launcher_stops_the_process_it_starts():
    script = _read("tools/tpu/launch.sh")
    header = script.split("set -euo pipefail")[0]
    assert "python3 -m vdm_jax" in header and "experiments.main" not in header
    assignment = re.search(r'^TRAIN_COMMAND="([^"]+)"$', script, re.M)
    assert assignment, "launch.sh names its training command in TRAIN_COMMAND"
    command = assignment.group(1)
    values = {"TRAIN_COMMAND": command, "REMOTE_DIR": "vdm_jax", "LOG": "vdm_jax_train.log"}
    values |= {"CONFIG": "vdm_jax/configs/cifar10.py", "WORKDIR": "gs://b/run", "FLAGS": ""}

    def expand(text):
        return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)

    start = expand(re.search(r'on_all_hosts "(.*)"', _launcher_case(script, "start")).group(1))
    stop = expand(re.search(r'on_all_hosts "(.*)"', _launcher_case(script, "stop")).group(1))
    # The training process's command line: what nohup executes on each host.
    started = re.search(r"nohup (.*?) >", start).group(1).strip()
    assert started.startswith("python3 -m vdm_jax --multihost"), started
    kill = re.search(r"pkill -TERM -f '([^']+)'", stop)
    assert kill, stop
    assert re.search(kill.group(1), started), (kill.group(1), started)
    # The shell that runs pkill on each host has the pattern in its own command line.
    assert not re.search(kill.group(1), f"bash -c {stop}"), (kill.group(1), stop)
