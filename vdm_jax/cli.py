"""Command line: train, evaluate, sample or report on a VDM from a config::

    python -m vdm_jax --config=vdm_jax/configs/digits.py --workdir=/tmp/digits
    python -m vdm_jax --config=vdm_jax/configs/cifar10.py:smoke --workdir=DIR \\
        --mode=eval --config.eval.discrete_timesteps=1000
    python -m vdm_jax --config=vdm_jax/configs/digits.py --workdir=/tmp/digits --mode=report

Many processes (hosts): start the same command on every host, with ``--multihost`` on a
Cloud TPU pod slice (see ``tools/tpu/``), or with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (or the ``JAX_*`` environment variables) elsewhere.

Also installed as the ``vdm-jax`` console script.

Exit status: 0 on success, also after a preemption (SIGTERM: a checkpoint was saved; run the
same command to resume); 1 on a user error (a bad flag, config value, data set, workdir or
checkpoint, a diverged run, a failed checkpoint write), printed as one ``error: ...`` message
without a traceback. Anything else is a bug and keeps its traceback.
"""

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vdm_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (e.g. vdm_jax/configs/digits.py[:smoke]).",
    lock_config=True,
)  # fmt: skip
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sample", "report"],
    "What to run: train (and evaluate and sample at the end), eval, sample, or report (plots "
    "and an HTML page of a trained run in WORKDIR/report).",
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
flags.mark_flags_as_required(["config", "workdir"])


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


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
        _fail(_without_traceback(str(e)))


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    # Imported here so that --help is fast and flags parse before jax initialises.
    from vdm_jax.training import checkpoint, parallel, trainer

    user_errors = (
        UserError,  # a bad config value, data set, workdir or incompatible checkpoint
        trainer.TrainingDivergedError,
        checkpoint.CheckpointCorruptError,
        checkpoint.CheckpointSaveError,
    )
    try:
        config, workdir = _CONFIG.value, _WORKDIR.value
        config.to_dict()  # a config file that failed to load raises only when used
    except OSError as e:  # e.g. the config file does not exist
        _fail(_without_traceback(str(e)))
    try:
        # Before anything else touches the devices; does nothing for a single process.
        parallel.initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_MULTIHOST.value
        )
        if _MODE.value == "train":
            trainer.train_and_evaluate(config, workdir)
        elif _MODE.value == "eval":
            trainer.evaluate(config, workdir)
        elif _MODE.value == "sample":
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
    """Drop the per-save INFO chatter of orbax and grain so training progress stays readable,
    and asyncio's "Task exception was never retrieved" reports of orbax's write tasks after a
    failed checkpoint write (the error itself is reported once, as ``error: ...``)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(f"{os.sep}{name}{os.sep}" in record.pathname for name in ("orbax", "grain"))
        if record.name == "asyncio" and "orbax" in str(record.msg) + str(record.args):
            return False
        return record.levelno >= pylogging.WARNING or not noisy


def run():
    """Console-script entry point."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
