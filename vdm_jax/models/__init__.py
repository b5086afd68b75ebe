"""Models and their use: the score network (:mod:`vdm_jax.models.unet`), the ``VDM`` module
(:mod:`vdm_jax.models.vdm`), samplers and the probability-flow likelihood
(:mod:`vdm_jax.models.sampling`) and evaluation of the bound over batches
(:mod:`vdm_jax.models.evaluation`). They import the maths, never the training system.
"""

__all__ = [
    "evaluation",
    "sampling",
    "unet",
    "vdm",
]
