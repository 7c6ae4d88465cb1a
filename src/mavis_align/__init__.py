"""mavis-align: multi-objective alignment via value-guided inference-time search (MAVIS)."""

__version__ = "0.1.0"
