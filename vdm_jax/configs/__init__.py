"""The bundled experiment configs: ``base`` lists every field; the others override a few."""
