"""The default experiment: the 8x8 digits bundled with scikit-learn (17 grey levels).

Trains in a few minutes on 2 CPU cores. ``--config=digits:smoke``
runs a few steps only.
"""

from vdm_jax.configs import base

__all__ = ["get_config"]


def get_config(variant: str = ""):
    """Digits; ``variant='smoke'`` for a seconds-long run."""
    config = base.get_config()
    config.data.name = "digits"
    config.model.n_layer = 2
    config.model.n_embd = 32
    config.model.dropout_rate = 0.0
    config.model.schedule_features = 64
    config.model.gamma_min = -8.0
    config.model.gamma_max = 6.0
    # The formulation that is fastest on CPUs, where this config trains in minutes.
    config.model.attention = "chunked"
    config.model.batch_pieces = 2
    config.model.reconstruction_window = 4
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 200
    config.optimizer.decay_steps = 4800  # cosine decay to the end of the run
    config.optimizer.weight_decay = 0.0
    config.optimizer.ema_decay = 0.995
    config.training.batch_size = 32
    config.training.num_train_steps = 5000
    config.training.log_every = 500
    config.training.eval_every = 0  # only at the end
    config.training.checkpoint_every = 1000
    config.training.sample_every = 0
    config.eval.batch_size = 297  # the whole test split in one batch
    config.sampling.num_samples = 64
    config.sampling.sampling_steps = 200
    return base.with_variant(config, variant)
