"""Importers of checkpoints written by other implementations."""

from .ktb import import_ktb, ktb_to_model

__all__ = ["import_ktb", "ktb_to_model"]
