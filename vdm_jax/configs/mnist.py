"""MNIST (28x28, 256 grey levels): the paper's network at a smaller width."""

from vdm_jax.configs import base

__all__ = ["get_config"]


def get_config(variant: str = ""):
    """MNIST; ``variant='smoke'`` for a seconds-long run."""
    config = base.get_config()
    config.data.name = "mnist"
    config.model.n_layer = 8
    config.model.n_embd = 64
    config.training.num_train_steps = 200_000
    return base.with_variant(config, variant)
