"""The config a run was trained with, read from its workdir: ``--config=run:WORKDIR``.

``WORKDIR/config.json`` (written when training starts) over the base config, so that fields
added since the run was trained take their defaults. ``--mode=eval``, ``sample``, ``report``
and ``show_config`` with ``--workdir`` and no ``--config`` use it; ``--config.*`` flags
override its fields as with any config.
"""

from vdm_jax.errors import UserError
from vdm_jax.training import run_files, schema

__all__ = ["get_config"]


def get_config(workdir: str = ""):
    """The config in ``workdir/config.json`` over the base config's defaults."""
    if not workdir:
        raise UserError("the config 'run' reads a run's own config: --config=run:WORKDIR")
    return schema.with_defaults(run_files.read_config(workdir))
