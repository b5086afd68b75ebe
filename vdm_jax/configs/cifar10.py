"""CIFAR-10 as in the paper: 32 blocks, 128 channels, learned linear gamma from -13.3 to 5,
continuous time, adamw (lr 2e-4, b2 0.99, weight decay 0.01), EMA 0.9999, batch 128, dropout
0.1, 10M steps. The base config already holds these values.
"""

from vdm_jax.configs import base

__all__ = ["get_config"]


def get_config(variant: str = ""):
    """CIFAR-10; ``variant='smoke'`` for a seconds-long run."""
    config = base.get_config()
    config.data.name = "cifar10"
    config.eval.discrete_timesteps = 1000
    return base.with_variant(config, variant)
