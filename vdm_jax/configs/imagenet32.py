"""Downsampled ImageNet 32x32: the paper's network at 256 channels, no dropout, batch 512."""

from vdm_jax.configs import base

__all__ = ["get_config"]


def get_config(variant: str = ""):
    """ImageNet 32x32; ``variant='smoke'`` for a seconds-long run."""
    config = base.get_config()
    config.data.name = "imagenet32"
    config.model.n_embd = 256
    config.model.dropout_rate = 0.0
    config.training.batch_size = 512
    config.training.num_train_steps = 2_000_000
    return base.with_variant(config, variant)
