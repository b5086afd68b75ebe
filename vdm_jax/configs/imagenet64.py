"""Downsampled ImageNet 64x64: 64 full-resolution blocks of 256 channels, no dropout."""

from vdm_jax.configs import base

__all__ = ["get_config"]


def get_config(variant: str = ""):
    """ImageNet 64x64; ``variant='smoke'`` for a seconds-long run."""
    config = base.get_config()
    config.data.name = "imagenet64"
    config.model.n_layer = 64
    config.model.n_embd = 256
    config.model.dropout_rate = 0.0
    config.training.batch_size = 512
    config.training.num_train_steps = 2_000_000
    return base.with_variant(config, variant)
