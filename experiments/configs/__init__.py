"""ml_collections configs: `base.py` holds every field; the others override a few."""
