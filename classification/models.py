"""Classification models: torchvision classifiers by name, weights from the enum or a local file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from bgd_dist.seeds import fixed_init

log = logging.getLogger(__name__)


def build_classifier(arch: str, weights: str | None = None, checkpoint: str | None = None,
                     **kwargs) -> nn.Module:
    """A torchvision classifier ``arch`` (e.g. ``resnet18``), in eval mode.

    ``checkpoint``: a local ``state_dict`` file (``.pth``; a dict with a
    ``state_dict`` or ``model`` entry also works), loaded without pickle
    (``weights_only=True``). ``weights``: a torchvision weights enum name
    (``IMAGENET1K_V1`` is what the paper used); downloaded only where the
    network allows, otherwise a clear error says to pass a local checkpoint.
    """
    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise ValueError(f"model.arch: unknown torchvision classifier {arch!r}") from None
    if checkpoint:
        with fixed_init():
            model = builder(weights=None, **kwargs)
        model.load_state_dict(load_state_dict(checkpoint))
    elif weights:
        enum = torchvision.models.get_model_weights(arch)
        try:
            w = enum[weights]
        except KeyError:
            raise ValueError(f"model.weights: {weights!r} is not one of {[e.name for e in enum]} for {arch}") from None
        try:
            model = builder(weights=w, **kwargs)
        except Exception as e:  # URLError, socket errors, ...
            raise RuntimeError(
                f"could not download the {arch} weights {weights} ({type(e).__name__}: {e}). Offline, download "
                f"{w.url} elsewhere and pass it with --set model.checkpoint=/path/to/file.pth"
            ) from e
    else:
        with fixed_init():
            model = builder(weights=None, **kwargs)
    return model.eval()


def load_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.checkpoint: {path} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch state dict ({e})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
        obj = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj
