"""Command line: train, evaluate or sample a VDM from a config.

    python -m experiments.main --config=experiments/configs/digits.py --workdir=/tmp/digits
    python -m experiments.main --config=experiments/configs/cifar10.py:smoke --workdir=DIR \\
        --mode=eval --config.eval.discrete_steps=1000

Also installed as the ``vdm-jax`` console script.
"""

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (e.g. experiments/configs/digits.py[:smoke]).",
    lock_config=True,
)  # fmt: skip
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Imported here so that --help is fast and flags parse before jax initialises.
    from vdm_jax import experiment

    config, workdir = _CONFIG.value, _WORKDIR.value
    try:
        if _MODE.value == "train":
            experiment.train_and_evaluate(config, workdir)
        elif _MODE.value == "eval":
            experiment.evaluate(config, workdir)
        else:
            experiment.sample(config, workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # A user error (bad config, data or workdir) or divergence: one clear line, no traceback.
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


class _QuietLibraries(pylogging.Filter):
    """Drop the per-save INFO chatter of orbax and grain so training progress stays readable."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        noisy = any(f"{os.sep}{name}{os.sep}" in record.pathname for name in ("orbax", "grain"))
        return record.levelno >= pylogging.WARNING or not noisy


def run():
    """Console-script entry point."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    app.run(main)


if __name__ == "__main__":
    run()
