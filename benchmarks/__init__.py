"""Benchmarks of the VDM train step, evaluation and sampling (see BENCHMARKS.md).

They import only ``vdm_jax.models.unet``, ``model``, ``train``, ``parallel``, ``sampling`` and
``schedules`` (jax, flax, optax, diffrax, numpy): no grain, tfds, orbax or ml_collections, so
they run on a bare accelerator machine with ``PYTHONPATH=.`` from the repository root.
"""
