"""MuLAN on CIFAR-10 as the authors' ``cifar10-conditioned`` config (s-sahoo/MuLAN,
``ldm/configs/cifar10-conditioned.py``, their ``model_mulan_velocity``): the paper's VDM
network (32 blocks of 128 channels, Fourier features, no attention, dropout 0.1) predicting
v, conditioned on a ``topk`` latent of 50 entries with k = 15 from an encoder of 4 blocks of
128 channels, the polynomial schedule per pixel with 3072 hidden units between the fixed
endpoints -13.3 and 5, adamw (lr 2e-4, b2 0.99, weight decay 0.01), EMA 0.9999, batch 128.

Import the authors' checkpoints with it (the importer prints each model field the
checkpoint's parameter tree sets otherwise; k and the parameterization are not in the tree)::

    python -m vdm_jax --mode=import --import_from=ckpt/mulan_cifar10 --config=cifar10_mulan \\
        --workdir=runs/cifar10_mulan_authors
"""

from vdm_jax.configs import base, cifar10

__all__ = ["get_config"]


def get_config(variant: str = ""):
    """CIFAR-10 with MuLAN; ``variant='smoke'`` for a seconds-long run."""
    config = cifar10.get_config()
    config.model.family = "mulan"
    config.model.latent_kind = "topk"
    config.model.latent_size = 50
    config.model.latent_k = 15
    config.model.encoder_n_layer = 4
    config.model.encoder_n_embd = 128
    config.model.schedule_features = 3072
    config.model.parameterization = "v"
    config.model.norm_min_group_size = 1  # their GroupNorm: 32 groups at every width
    config.eval.discrete_timesteps = 0  # MuLAN's bound is the continuous-time one
    return base.with_variant(config, variant)
