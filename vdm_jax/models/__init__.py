"""Models and their use: the score network (:mod:`vdm_jax.models.unet`, with its attention in
:mod:`vdm_jax.models.attention` and its input features in :mod:`vdm_jax.models.embeddings`),
the ``VDM`` module (:mod:`vdm_jax.models.vdm`), what sampling asks of a model
(:mod:`vdm_jax.models.protocol`), discrete-time samplers (:mod:`vdm_jax.models.sampling`),
the probability-flow ODE and its likelihood (:mod:`vdm_jax.models.ode`) and evaluation of
the bound over batches (:mod:`vdm_jax.models.evaluation`). They import the maths, never the
training system.
"""

__all__ = ["attention", "embeddings", "evaluation", "ode", "protocol", "sampling", "unet", "vdm"]
