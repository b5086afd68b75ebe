"""The equal-steps comparison with the original code: our side's config.

    python -m vdm_jax --config=experiments/equal_steps/config.py \
        --config.data.data_dir=DATA --workdir=runs/equal_steps_ours

Built on the bundled CIFAR-10 config (the paper's model, schedule and optimiser), shrunk to the
study's protocol: a folder of 32x32 RGB images (``DATA``, the subset that ``run.py`` writes),
4 blocks x 32 channels, batch 32, AdamW 2e-4 with 100 warm-up steps and no decay, as the
original code's optimiser. See README.md.
"""

from vdm_jax.configs import base, cifar10
from vdm_jax.errors import UserError

STEPS = 300
#: Where run.py writes the protocol's subset of an image folder by default.
DATA = "/tmp/vdm_equal_steps/data"


def get_config(arg: str = ""):
    """The study's config; ``arg`` is ``STEPS[,smoke]``: the number of training steps (default
    300), and ``smoke`` for the protocol at the smoke model's size (1 block x 16 channels,
    batch 8, evaluated in batches of 8, one device), to check the script in seconds."""
    options = [a for a in arg.split(",") if a]
    unknown = [a for a in options if a != "smoke" and not a.isdigit()]
    if unknown:
        raise UserError(f"equal_steps: unknown config argument {unknown[0]!r}; give STEPS[,smoke]")
    steps = next((int(a) for a in options if a.isdigit()), STEPS)
    config = cifar10.get_config()
    config.data.name = "folder"
    config.data.data_dir = DATA
    config.model.n_layer = 4
    config.model.n_embd = 32
    # Our CPU formulation (the same function, computed faster on 2-core CPUs).
    config.model.attention = "chunked"
    config.model.batch_pieces = 2
    config.model.reconstruction_window = 4
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 100
    config.optimizer.decay_steps = 0
    # A short run evaluates the moving average of its parameters: at the paper's 0.9999 that
    # average would still be mostly the initial parameters after a few hundred steps.
    config.optimizer.ema_decay = 0.95
    config.training.batch_size = 32
    config.training.num_train_steps = steps
    config.training.log_every = 25
    config.training.eval_every = 0  # once, at the end
    config.training.checkpoint_every = config.training.num_train_steps
    config.training.sample_every = 0
    config.eval.batch_size = 100
    config.eval.discrete_timesteps = 0
    # The grid of samples written at the end of a run: a few cheap ones.
    config.sampling.num_samples = 4
    config.sampling.sampling_steps = 50
    if "smoke" in options:
        base.smoke(config)
        config.parallel.num_devices = 1  # it runs the protocol's code, not a device layout
        config.training.batch_size = config.eval.batch_size = 8
        config.training.num_train_steps = config.training.checkpoint_every = steps
        config.training.eval_every = 0
        config.sampling.num_samples = 2
    return config
