"""The schedule study: the digits config with a learned linear or a learned monotonic schedule.

    python -m vdm_jax --config=experiments/schedule_invariance/config.py:monotonic \
        --workdir=runs/schedule_monotonic

``get_config("KIND[,STEPS][,smoke]")``: ``monotonic`` (the paper's monotonic network, its
endpoints trained by the bound and its shape by the variance-minimising gradient of appendix
I.2, ``model.variance_gradient``) or ``linear`` (the learned linear schedule: only the
endpoints learn); STEPS training steps (1500, the study's; warm-up and cosine decay follow);
``smoke``: the digits smoke model, on one device. Built on the bundled digits config.
"""

from vdm_jax.configs import digits
from vdm_jax.errors import UserError

STEPS = 1500
KINDS = {
    "monotonic": {"schedule": "monotonic", "variance_gradient": True},
    "linear": {"schedule": "learned_linear", "variance_gradient": False},
}


def get_config(arg: str = "monotonic"):
    """The digits config with one schedule kind of the study (see the module docstring)."""
    kind, *options = arg.split(",")
    if kind not in KINDS:
        raise UserError(f"unknown schedule kind {kind!r}: choose from {sorted(KINDS)}")
    smoke = "smoke" in options
    numbers = [int(option) for option in options if option.isdigit()]
    steps = numbers[0] if numbers else (2 if smoke else STEPS)
    config = digits.get_config("smoke" if smoke else "")
    if smoke:
        config.parallel.num_devices = 1  # it runs the protocol's code, not a device layout
    config.training.num_train_steps = steps
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    config.optimizer.decay_steps = max(steps - config.optimizer.warmup_steps, 1)
    config.training.checkpoint_every = steps
    config.training.log_every = max(steps // 5, 1)
    config.training.eval_every = 0  # once, at the end
    config.sampling.sampling_steps = 20  # the grid written at the end; not part of the study
    for field, value in KINDS[kind].items():
        config.model[field] = value
    return config
