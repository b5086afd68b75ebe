"""The base config: every field an experiment reads, at its default (the paper's CIFAR-10
settings), built from the training layer's schema (:data:`vdm_jax.training.schema.FIELDS`,
which also says what each field means and may hold; ``--mode=show_config`` prints it).
Data-set configs start from :func:`get_config` and override only what differs. Fields with no
value are ml_collections placeholders (typed, None until set), so they can still be set from
the command line, e.g. ``--config.data.data_dir=/data/tfds``.
"""

import ml_collections

from vdm_jax.errors import UserError
from vdm_jax.training import schema

__all__ = ["VARIANTS", "get_config", "smoke", "with_variant"]


def get_config() -> ml_collections.ConfigDict:
    """The base config (CIFAR-10 as in the paper): every field at its default."""
    return schema.base_config()


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink any config to a few cheap steps that run anywhere (a CPU in seconds)."""
    config.model.n_layer = 1
    config.model.n_embd = 16
    config.model.schedule_features = 16
    config.model.encoder_n_layer = 1  # MuLAN's encoder (model.family='mulan')
    config.model.encoder_n_embd = 16
    config.model.dropout_rate = 0.0
    # One piece: splitting a batch of 16 saves no time, and each piece is one more copy of the
    # network to trace and compile.
    config.model.batch_pieces = 1
    config.training.batch_size = 16
    config.training.num_train_steps = 4
    config.training.log_every = 2
    config.training.eval_every = 4
    config.training.checkpoint_every = 2
    config.training.sample_every = 0
    config.optimizer.warmup_steps = 0
    config.optimizer.ema_decay = 0.9
    config.eval.batch_size = 64
    config.sampling.num_samples = 16
    config.sampling.sampling_steps = 10
    return config


VARIANTS = {"smoke": smoke}


def with_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Apply the named variant ('' for none; 'smoke') to a config."""
    if not variant:
        return config
    if variant not in VARIANTS:
        raise UserError(f"unknown config variant {variant!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[variant](config)
