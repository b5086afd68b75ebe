"""The bundled experiment configs: ``base`` lists every field, the others override a few, and
``run`` reads a trained run's own config from its workdir."""

__all__: list[str] = []
