"""MuLAN (Sahoo et al. 2024) on the 8x8 digits: the ``digits`` config's network, optimizer
and run length with a learned schedule per pixel, conditioned on a latent c ~ q(c|x).

The latent is a diagonal Gaussian of 8 dimensions against N(0, I) (a true bound; the
authors' CIFAR-10 runs use ``topk``, see ``cifar10_mulan``), inferred by an encoder of one
block of 32 channels; the score network predicts v, as the authors' velocity model; the
per-pixel schedule runs between the fixed endpoints -8 and 6 (``digits``' initial ones)
through a polynomial network of 64 hidden units. ``--config=digits_mulan:smoke`` runs a few
steps only.
"""

from vdm_jax.configs import base, digits

__all__ = ["get_config"]


def get_config(variant: str = ""):
    """Digits with MuLAN; ``variant='smoke'`` for a seconds-long run."""
    config = digits.get_config()
    config.model.family = "mulan"
    config.model.latent_kind = "gaussian"
    config.model.latent_size = 8
    config.model.encoder_n_layer = 1
    config.model.encoder_n_embd = 32
    config.model.parameterization = "v"
    # MuLAN's reconstruction term is the full softmax (no windowed normaliser).
    config.model.reconstruction_window = 0
    return base.with_variant(config, variant)
