"""The likelihood estimators study: the configs of its two models.

    python -m vdm_jax --config=experiments/likelihood_estimators/config.py:digits \
        --workdir=runs/estimators_digits
    python -m vdm_jax --mode=import --import_from=tests/fixtures/authors_vdm/scalar \
        --config=experiments/likelihood_estimators/config.py:authors \
        --config.data.data_dir=IMAGES --workdir=runs/estimators_authors

``get_config("digits")``: the bundled digits config as it is (the README's main job: 5000
steps, the whole 297-image test split in one evaluation batch); ``digits,smoke``: the digits
smoke model (4 steps) on one device. ``get_config("authors")``: the config an original-code
checkpoint (``tests/fixtures/authors_vdm/scalar``) is imported with, the bundled CIFAR-10
smoke config (the checkpoint fixes the model's fields) on a folder of 32x32 images
(``data.data_dir``, which ``run.py`` writes from the fixture's 16 evaluation images); one
evaluation batch holds those 16.
"""

from vdm_jax.configs import cifar10, digits
from vdm_jax.errors import UserError

VARIANTS = ("digits", "digits,smoke", "authors")
#: The image folder of ``authors`` unless ``data.data_dir`` names another (run.py writes
#: WORKDIR/authors_images and sets it).
IMAGES = "/tmp/vdm_likelihood_estimators/authors_images"


def get_config(arg: str = "digits"):
    """One model's config of the study (see the module docstring)."""
    if arg not in VARIANTS:
        raise UserError(f"unknown model {arg!r} of the estimators study: choose from {VARIANTS}")
    if arg == "digits,smoke":
        config = digits.get_config("smoke")
        config.parallel.num_devices = 1  # it runs the protocol's code, not a device layout
        return config
    if arg == "digits":
        return digits.get_config()
    config = cifar10.get_config("smoke")
    config.data.name = "folder"
    config.data.data_dir = IMAGES
    config.model.attention = "chunked"  # the same function, faster on CPUs
    config.eval.batch_size = 16
    config.eval.discrete_timesteps = 0
    return config
