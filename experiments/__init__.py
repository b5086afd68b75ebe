"""Studies: one folder each, with its config, its commands and a README of its results.

Not part of the installed package: run a study's script from the checkout,
``python experiments/NAME/run.py ...``, or train its config with
``python -m vdm_jax --config=experiments/NAME/config.py``.
"""
