"""Command line: train, evaluate, sample or report on a VDM from a config, or show a config::

    python -m vdm_jax --config=digits --workdir=/tmp/digits
    python -m vdm_jax --config=path/to/my_config.py:ARG --workdir=DIR
    python -m vdm_jax --workdir=/tmp/digits --mode=eval --config.eval.discrete_timesteps=1000
    python -m vdm_jax --workdir=/tmp/digits --mode=sample --config.sampling.sampler=ddim
    python -m vdm_jax --workdir=/tmp/digits --mode=eval --config.eval.estimator=ode_iw
    python -m vdm_jax --workdir=/tmp/digits --mode=sample --config.sampling.num_images=50000
    python -m vdm_jax --workdir=/tmp/digits --mode=report
    python -m vdm_jax --config=digits:smoke --mode=show_config

``--config`` is the name of a bundled config (a file of :mod:`vdm_jax.configs`: ``digits``,
``cifar10``, ``cifar10_aug``, ``mnist``, ``imagenet32``, ``imagenet64``, and MuLAN's
``digits_mulan``, ``cifar10_mulan``), with ``:smoke`` for
a few-step variant, the path of a config file (``path.py[:ARG]``, its ``get_config(ARG)``), or
``run:WORKDIR``, a trained run's own config (:mod:`vdm_jax.configs.run`), which eval, sample,
report and show_config take when ``--workdir`` is given without ``--config``.
``--config.SECTION.FIELD=VALUE`` overrides a field; ``--mode=show_config`` lists them all
with their defaults and meanings (:data:`vdm_jax.training.schema.FIELDS`). On a trained run
(eval, sample, report, and show_config given ``--workdir``), the fields that fix its checkpoint
come from the run, and an override that disagrees with the run is refused
(:func:`vdm_jax.training.schema.for_trained_run`).

``--mode=import --import_from=PATH`` writes a checkpoint of the original VDM code (or of
MuLAN's code, the same layout) into a new workdir as a run of ours
(:mod:`vdm_jax.training.importer`); eval, sample and training on from it then work with the
same ``--config``, whose fields that fix the checkpoint the run's replace.

Many processes (hosts): start the same command on every host, with ``--multihost`` on a
Cloud TPU pod slice (see ``tools/tpu/``), or with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (or the ``JAX_*`` environment variables) elsewhere.

Also installed as the ``vdm-jax`` console script.

Exit status: 0 on success, also after a preemption (SIGTERM: a checkpoint was saved; run the
same command to resume); 1 on a user error (a bad flag or override, config value, data set,
workdir or checkpoint, a diverged run, a failed checkpoint write), printed as one
``error: ...`` message without a traceback. Anything else is a bug and keeps its traceback.
"""

import difflib
import logging as pylogging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vdm_jax import configs
from vdm_jax.errors import UserError

__all__ = ["main", "parse_flags", "plain_text", "run"]

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "A bundled config (digits, cifar10, cifar10_aug, mnist, imagenet32, imagenet64, "
    "digits_mulan, cifar10_mulan; "
    "'digits:smoke' for a few steps), a config file (path/to/config.py[:ARG]) or "
    "run:WORKDIR (a trained run's own; the default of eval, sample, report and show_config "
    "given --workdir). Override fields with --config.SECTION.FIELD=VALUE; --mode=show_config "
    "lists them.",
    lock_config=True,
)  # fmt: skip
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sample", "report", "show_config", "import"],
    "What to run: train (and evaluate and sample at the end), eval, sample, report (plots "
    "and an HTML page of a trained run in WORKDIR/report), show_config (print every "
    "field of the config with its default and meaning; given --workdir, the config eval "
    "would use on that run), or import (a "
    "checkpoint of the original VDM code or of MuLAN's, --import_from, as a new run in WORKDIR).",
)  # fmt: skip
_IMPORT_FROM = flags.DEFINE_string(
    "import_from", None,
    "--mode=import: a checkpoint of the original VDM code (its folder, e.g. "
    ".../checkpoint-final/checkpoints-0, or the ckpt-N.flax file; local or gs://).",
)  # fmt: skip
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "Start JAX's distributed runtime, detecting the cluster (Cloud TPU pod slice, SLURM, "
    "Open MPI). Not needed with --coordinator_address or $JAX_COORDINATOR_ADDRESS.",
)  # fmt: skip
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 in a multi-process run (default $JAX_COORDINATOR_ADDRESS).",
)  # fmt: skip
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in a multi-process run (default $JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0-based (default $JAX_PROCESS_ID)."
)

# The modes that work on a trained run, whose own config they read when --config is not given.
_READS_RUN = ("eval", "sample", "report", "show_config")
# --config.NAME[=VALUE], --noconfig.NAME (a boolean field), one or two dashes.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]*)")
_SHOW_FIELDS = "--mode=show_config lists the fields"


def _fail(message: str) -> None:
    """Print one ``error: ...`` message (continuation lines indented) and exit with 1."""
    lines = str(message).strip().splitlines() or ["unknown error"]
    print("error: " + "\n  ".join(line.strip() for line in lines if line.strip()), file=sys.stderr)
    sys.exit(1)


def _without_traceback(text: str) -> str:
    """ml_collections embeds the traceback of a config file's error in the flag error: keep
    the text before it and the exception's own last line."""
    marker = "Traceback (most recent call last)"
    if marker not in text:
        return text
    head = text.split(marker)[0].strip().rstrip(":").strip()
    tail = [line.strip() for line in text.split(marker)[-1].splitlines() if line.strip()]
    return f"{head}: {tail[-1]}" if tail else head


def _bundled_configs() -> list[str]:
    """The names of the bundled experiment configs, sorted: the files of
    :mod:`vdm_jax.configs` but ``base`` (the fields they start from) and ``run`` (a trained
    run's own config, :mod:`vdm_jax.configs.run`)."""
    folder = os.path.dirname(configs.__file__)
    names = (n[:-3] for n in os.listdir(folder) if n.endswith(".py") and n[0] != "_")
    return sorted(n for n in names if n not in ("base", "run"))


def _config_file(value: str) -> str:
    """The ``--config`` value ``NAME[:ARG]`` of a bundled config (or ``run:WORKDIR``) as
    ``PATH[:ARG]`` of its file; the path of a config file (``path.py[:ARG]``) is returned
    unchanged.

    Raises:
      UserError: neither a bundled config nor an existing file, with the closest name.
    """
    name, sep, arg = value.partition(":")
    known = _bundled_configs()
    is_path = name.endswith(".py") or os.sep in name or bool(os.altsep and os.altsep in name)
    if name in [*known, "run"] and not is_path:
        return os.path.join(os.path.dirname(configs.__file__), f"{name}.py") + sep + arg
    if os.path.isfile(name):
        return value
    if is_path:
        what = f"no config file {name}"
    else:
        close = difflib.get_close_matches(name, known, n=1)
        what = f"no bundled config {name!r}" + (
            f"; did you mean --config={close[0]}{sep}{arg}?" if close else ""
        )
    raise UserError(
        f"--config={value}: {what} (bundled: {', '.join(known)}; run:WORKDIR, a trained "
        "run's own; or the path of a config file, path/to/config.py[:ARG])"
    )


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of the last ``--name=VALUE`` or ``--name VALUE`` in argv, or None."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        if re.match(rf"^--?{name}=", arg):
            value = arg.split("=", 1)[1]
        elif re.match(rf"^--?{name}$", arg) and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _check_override_names(argv: list[str]) -> None:
    """Refuses a ``--config.NAME`` override that names no field of the config (every config
    has exactly the base config's fields), before ml_collections turns it into a traceback.

    Raises:
      UserError: naming the flag and the closest known field or section.
    """
    names = [(m.group(0), m.group(1)) for m in map(_OVERRIDE.match, argv[1:]) if m]
    if not names:
        return
    from vdm_jax.training.schema import field_defaults

    fields = field_defaults()
    sections = {name.split(".")[0] for name in fields if "." in name}
    for flag, name in names:
        if name in fields:
            continue
        if name in sections:
            example = next(f for f in fields if f.startswith(name + "."))
            raise UserError(
                f"{flag}: {name} is a section of the config, not a field: set its fields one "
                f"by one, e.g. --config.{example}=... ({_SHOW_FIELDS})"
            )
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts)))
        parent = next((p for p in prefixes if p in fields), None)
        if parent is not None:
            raise UserError(
                f"{flag}: {parent} is a field (= {fields[parent]!r}), it has no "
                f"{name[len(parent) + 1 :]!r}; set it with --config.{parent}=VALUE"
            )
        what = "field" if parts[0] in sections else "section or field"
        message = f"{flag}: the config has no {what} {name!r}"
        close = difflib.get_close_matches(name, list(fields), n=1)
        if close:
            message += f"; did you mean --config.{close[0]}?"
        elif close := difflib.get_close_matches(parts[0], sorted(sections), n=1):
            message += f"; did you mean the section {close[0]!r}?"
        raise UserError(f"{message} ({_SHOW_FIELDS})")


_KINDS = {bool: "True or False", int: "an integer", float: "a number"}


def _flag_error(error: flags.Error, config_label: str) -> str:
    """The one-line message of a flag error: a config file that raised gives its own
    message after ``config_label``; a ``--config.*`` value of the wrong type says what the
    field takes."""
    text = _without_traceback(str(error))
    if text.startswith("flag --config="):
        # The exception's own last line, without the class name of our user errors.
        cause = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
        cause = re.sub(r"^[\w.]*UserError: ", "", cause)
        return f"{config_label}{cause}"
    m = re.match(r"flag --config\.([\w.]+)=(.*?): ", text)
    if m:
        from vdm_jax.training.schema import field

        kind = field(m.group(1)).type
        if kind in _KINDS:
            return (
                f"--config.{m.group(1)}={m.group(2)}: {m.group(1)} must be {_KINDS[kind]}, "
                f"got {m.group(2)!r}"
            )
    return f"{text} (--helpshort lists the flags)"


def parse_flags(argv):
    """The command line's flags from ``argv`` (``[program, *flags]``), for :func:`main`.

    absl's flag parsing after two rewrites of argv: a bundled config's name becomes its
    file's path, and a mode that reads a trained run given ``--workdir`` and no ``--config``
    gets ``--config=run:WORKDIR`` (before the overrides, as ml_collections requires)."""
    argv, label = list(argv), ""
    try:
        value = _flag_value(argv, "config")
        workdir = _flag_value(argv, "workdir")
        if value is not None:
            label = f"--config={value}: "
            for i, arg in enumerate(argv):
                if re.match(r"^--?config=", arg):
                    argv[i] = f"--config={_config_file(arg.split('=', 1)[1])}"
                elif re.match(r"^--?config$", arg) and i + 1 < len(argv):
                    argv[i + 1] = _config_file(argv[i + 1])
        elif _flag_value(argv, "mode") in _READS_RUN and workdir:
            argv.insert(1, f"--config={_config_file('run:' + workdir)}")
        _check_override_names(argv)
    except UserError as e:
        _fail(str(e))
    sys.argv = argv  # ml_collections reads the overrides from sys.argv
    # A second parse in one process (tests, notebooks) starts from the defaults: absl keeps
    # the values of flags an earlier argv gave, and ml_collections defines a flag per
    # --config.FIELD override, which may not be defined twice.
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(_flag_error(e, label))


def _format_config(config) -> str:
    """Every field of a checked ``config``, one a line in the schema's order after a header:
    ``name = value  [default D]  meaning``, the default and the meaning taken from the schema
    (:data:`vdm_jax.training.schema.FIELDS`)."""
    from vdm_jax.training.schema import field_defaults, field_meanings, flatten

    defaults, meanings = field_defaults(), field_meanings()
    values = flatten(config.to_dict())
    rows = [
        (f"{name} = {values[name]!r}", f"[default {default!r}]", meanings[name])
        for name, default in defaults.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
    header = "# field = value  [the base config's default]  meaning (--config.FIELD=VALUE)"
    return "\n".join([header, *lines])


def main(argv):
    """Runs ``--mode`` on the parsed flags (absl's ``app.run`` calls it with the arguments left
    after the flags, which must be none); user errors exit with one ``error:`` line."""
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    mode, workdir = _MODE.value, _WORKDIR.value
    if _CONFIG.value is None:
        _fail(
            f"--mode={mode} needs --config: a bundled config ({', '.join(_bundled_configs())}; "
            "e.g. --config=digits:smoke), a config file (path/to/config.py), or run:WORKDIR "
            "(a trained run's own)" + ("" if mode == "train" else "; or --workdir of a trained run")
        )
    if workdir is None and mode != "show_config":
        _fail(f"--mode={mode} needs --workdir: the folder of the run")
    # Imported here so that --help is fast and flags parse before jax initialises.
    from vdm_jax.training import checkpoint, importer, parallel, run_files, trainer
    from vdm_jax.training.schema import check_config, for_trained_run

    user_errors = (
        UserError,  # a bad config value, data set, workdir or incompatible checkpoint
        trainer.TrainingDivergedError,
        checkpoint.CheckpointCorruptError,
        checkpoint.CheckpointSaveError,
    )
    try:
        config = _CONFIG.value
        config.to_dict()  # a config file that failed to load raises only when used
    except OSError as e:  # e.g. the config file does not exist
        _fail(_without_traceback(str(e)))
    try:
        explicit = config_flags.get_override_values(flags.FLAGS["config"])
        # The fields that fix a trained run's checkpoint come from the run; when training, only
        # from a run imported from the original code (its --config is not the run's own);
        # show_config shows what eval would use, so only given a run.
        reads_run = mode in _READS_RUN and workdir is not None
        if reads_run or (mode == "train" and importer.is_imported(workdir)):
            config = for_trained_run(config, run_files.read_config(workdir), explicit)
        if mode == "show_config":
            check_config(config)
            try:
                print(_format_config(config), flush=True)
            except BrokenPipeError:  # e.g. piped into head: the reader has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        # Before anything else touches the devices; does nothing for a single process.
        parallel.initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_MULTIHOST.value
        )
        if mode == "import":
            if not _IMPORT_FROM.value:
                raise UserError("--mode=import needs --import_from=PATH (the original checkpoint)")
            result = importer.import_original(config, workdir, _IMPORT_FROM.value, explicit)
            for name, (given, read) in sorted(result.differences.items()):
                print(f"model.{name}: {read!r} from the checkpoint (the config has {given!r})")
            print(f"imported step {result.step} into {workdir}")
            return
        if mode == "train":
            trainer.train_and_evaluate(config, workdir)
        elif mode == "eval":
            trainer.evaluate(config, workdir)
        elif mode == "sample":
            trainer.sample(config, workdir)
        else:
            trainer.report(config, workdir)
    except user_errors as e:
        _fail(str(e))
    except OSError as e:
        if e.filename is None:  # not about a file or folder of the user's: a bug
            raise
        _fail(str(e))  # e.g. a file that cannot be read or written, a full disk


class _QuietLibraries(pylogging.Filter):
    """Drop the per-save INFO chatter of orbax and grain so training progress stays readable;
    asyncio's "Task exception was never retrieved" reports of orbax's write tasks after a
    failed checkpoint write (the error itself is reported once, as ``error: ...``); orbax's
    warning that checkpoints opened to be read are read-only; and JAX's INFO note that it
    found no TPU, printed on every machine without one (a TPU that was asked
    for and fails is an error of its own, not this note)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(f"{os.sep}{name}{os.sep}" in record.pathname for name in ("orbax", "grain"))
        if record.name == "asyncio" and "orbax" in str(record.msg) + str(record.args):
            return False
        if record.levelno < pylogging.WARNING and record.getMessage().startswith(
            "Unable to initialize backend 'tpu'"
        ):
            return False
        if noisy and record.getMessage().startswith("Given directory is read only"):
            return False  # orbax's note that eval and sample open the checkpoints read-only
        return record.levelno >= pylogging.WARNING or not noisy


def plain_text(doc: str) -> str:
    """``doc`` (a reStructuredText docstring) as the command line's help prints it: each
    Sphinx cross-reference and each inline literal replaced by its plain text, and a literal
    block's double colon by one colon."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    doc = re.sub(r"``([^`]+)``", r"\1", doc)
    return re.sub(r"::$", ":", doc, flags=re.M)


def run():
    """Console-script entry point."""
    # --help and --helpshort print the running program's docstring: this module's, as text.
    main_module = sys.modules.get("__main__")
    if main_module is not None:
        main_module.__doc__ = plain_text(__doc__)
    # --helpshort lists the flags of the program that runs (sys.argv[0]): these.
    for flag in flags.FLAGS.flags_by_module_dict().get(__name__, []):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
