"""``python -m vdm_jax``: the command line (see :mod:`vdm_jax.cli`)."""

from vdm_jax.cli import run

__all__: list[str] = []

if __name__ == "__main__":
    run()
