"""bgd-dist: activation-aware product quantization ("And the Bit Goes Down") on a Ray cluster."""

__version__ = "0.1.0"


def load_compressed(path, map_location="cpu", dense=False, model=None):
    """Load a ``model.bgd`` file into a plain ``nn.Module`` (see :mod:`bgd_dist.fileformat`).
    ``dense=True``: the original architecture with plain layers (:mod:`bgd_dist.export`).
    ``model``: the dense architecture to load into, for a file written from a user's own model
    class (see :func:`compress`)."""
    from .fileformat import load_compressed as _load

    return _load(path, map_location=map_location, dense=dense, model=model)


def compress(model, data, out, **options):
    """Compress any ``nn.Module`` with calibration inputs; returns ``(compressed model, report)``.
    See :func:`bgd_dist.api.compress` for the options."""
    from .api import compress as _compress

    return _compress(model, data, out, **options)
