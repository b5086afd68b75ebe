"""The paper's CIFAR-10 model (Kingma et al. 2021, table 1 and appendix B), as a recipe.

    python -m vdm_jax --config=experiments/paper_cifar10/config.py --workdir=gs://BUCKET/run

``get_config("")``: without augmentation, the bundled ``vdm_jax/configs/cifar10.py`` (32
blocks x 128 channels, Fourier features, attention in the middle, a learned linear schedule
from [-13.3, 5], continuous time, dropout 0.1, AdamW lr 2e-4 with 100 warm-up steps, b2 0.99,
weight decay 0.01, EMA 0.9999, batch 128, 10M steps). ``get_config("aug")``: the bundled
``cifar10_aug.py``, the original code's augmented model and its second released checkpoint
(flips and 90-degree rotations flagged to the network, 32 blocks x 256 channels, its network
schedule, dropout 0.05, lr 1e-4, batch 768).
"""

from vdm_jax.configs import cifar10, cifar10_aug
from vdm_jax.errors import UserError

VARIANTS = {"": cifar10.get_config, "aug": cifar10_aug.get_config}


def get_config(arg: str = ""):
    """The paper's CIFAR-10 config (``arg``: ``""`` or ``"aug"``)."""
    if arg not in VARIANTS:
        raise UserError(f"unknown variant {arg!r} of paper_cifar10: give '' or 'aug'")
    return VARIANTS[arg]()
