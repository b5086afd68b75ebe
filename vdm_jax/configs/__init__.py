"""The bundled experiment configs: ``base`` holds every field at its default (built from
:data:`vdm_jax.training.schema.FIELDS`), the others override a few, and ``run`` reads a
trained run's own config from its workdir."""

__all__: list[str] = []
