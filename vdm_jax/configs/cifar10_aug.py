"""CIFAR-10 with the original code's augmentation, as its ``cifar10_aug`` config: random
left-right flips and 90-degree rotations (``data.augment``), 32 blocks of 256 channels, the
original network schedule (``monotonic_unnormalised``, endpoints not pinned) from -13.3 to 5,
the scalar conditioning input fed the flag "this image was flipped or rotated", dropout 0.05,
adamw (lr 1e-4, b2 0.99, weight decay 0.01), EMA 0.9999, batch 768.

Import the authors' augmented checkpoint with this config (the importer prints each model
field the checkpoint's parameter tree sets otherwise)::

    python -m vdm_jax --mode=import --import_from=ckpt/cifar10_aug --config=cifar10_aug \\
        --workdir=runs/cifar10_aug_authors
"""

from vdm_jax.configs import base

__all__ = ["get_config"]


def get_config(variant: str = ""):
    """CIFAR-10 with augmentation; ``variant='smoke'`` for a seconds-long run."""
    config = base.get_config()
    config.data.name = "cifar10"
    config.data.augment = True
    config.model.n_embd = 256
    config.model.dropout_rate = 0.05
    config.model.schedule = "monotonic_unnormalised"
    config.model.schedule_features = 1024
    config.model.conditioning_input = True
    config.model.norm_min_group_size = 1
    config.optimizer.learning_rate = 1e-4
    config.training.batch_size = 768
    config.training.num_train_steps = 100_000_000
    config.eval.batch_size = 1024
    config.eval.discrete_timesteps = 1000
    return base.with_variant(config, variant)
