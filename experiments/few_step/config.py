"""The few-step study's trained model: the bundled digits config (vdm_jax/configs/digits.py).

    python -m vdm_jax --config=experiments/few_step/config.py --workdir=runs/few_step_digits

It checkpoints every 1000 steps and keeps them all; the study's figures read the checkpoint at
step 1000 (``run.py --workdir runs/few_step_digits --step 1000``). ``get_config("smoke")``:
seconds.
"""

from vdm_jax.configs import digits


def get_config(arg: str = ""):
    """The digits config (``arg``: its variant, e.g. ``smoke``)."""
    config = digits.get_config(arg)
    config.training.keep_checkpoints = 5  # the step-1000 one among them
    return config
