"""The maths: pure functions of arrays and small Flax modules, no config objects and no I/O.

The forward process, its posterior and the parameterisation conversions
(:mod:`vdm_jax.maths.diffusion`), the bound's terms (:mod:`vdm_jax.maths.losses`), noise
schedules (:mod:`vdm_jax.maths.schedules`), weightings of the bound
(:mod:`vdm_jax.maths.weightings`) and the Frechet distance (:mod:`vdm_jax.maths.frechet`).
"""

__all__ = ["diffusion", "frechet", "losses", "schedules", "weightings"]
