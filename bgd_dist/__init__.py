"""bgd-dist: activation-aware product quantization ("And the Bit Goes Down") on a Ray cluster."""

__version__ = "0.1.0"


def load_compressed(path, map_location="cpu", dense=False):
    """Load a ``model.bgd`` file into a plain ``nn.Module`` (see :mod:`bgd_dist.fileformat`);
    ``dense=True``: the original architecture with plain layers (:mod:`bgd_dist.export`)."""
    from .fileformat import load_compressed as _load

    return _load(path, map_location=map_location, dense=dense)
