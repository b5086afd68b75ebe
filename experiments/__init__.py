"""Experiment configs and the command-line entry point of vdm_jax."""
