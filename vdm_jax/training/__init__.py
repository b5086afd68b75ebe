"""The training system: config, train and eval steps, data, checkpoints, the trainer.

Nothing in :mod:`vdm_jax`'s maths and models (the top-level modules) imports this package,
so a user who only wants the maths gets none of orbax, grain or tfds.
"""

__all__: list[str] = []
