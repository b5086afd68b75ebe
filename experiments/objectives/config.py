"""The objectives study: the digits config trained with the ELBO or a weighted objective.

    python -m vdm_jax --config=experiments/objectives/config.py:sigmoid --workdir=runs/sigmoid

``get_config("VARIANT[,STEPS][,smoke]")``: ``elbo`` (the VDM objective, learned linear
schedule, eps-prediction), ``sigmoid`` (the sigmoid weighting of Kingma & Gao 2023 with bias
b = 2, adaptive noise levels, eps-prediction) or ``sigmoid_v`` (the same with v-prediction);
STEPS training steps (2000, the study's; the warm-up and the cosine decay follow); ``smoke``:
the digits smoke model, on one device. Built on the bundled digits config
(vdm_jax/configs/digits.py).
"""

from vdm_jax.configs import digits
from vdm_jax.errors import UserError

STEPS = 2000
VARIANTS = {
    "elbo": {},
    "sigmoid": {
        "objective.weighting": "sigmoid",
        "objective.bias": 2.0,
        "objective.noise_levels": "adaptive",
    },
    "sigmoid_v": {
        "objective.weighting": "sigmoid",
        "objective.bias": 2.0,
        "objective.noise_levels": "adaptive",
        "model.parameterization": "v",
    },
}


def get_config(arg: str = "elbo"):
    """The digits config of one variant of the study (see the module docstring)."""
    variant, *options = arg.split(",")
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}: choose from {sorted(VARIANTS)}")
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
    config.training.log_every = max(steps // 4, 1)
    config.training.eval_every = 0  # once, at the end
    for name, value in VARIANTS[variant].items():
        section, field = name.split(".")
        config[section][field] = value
    return config
