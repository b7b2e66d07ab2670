"""Mask R-CNN models from torchvision: the paper's R50-FPN, or smaller ones built from a config."""

from __future__ import annotations

import torchvision
from torch import nn


def build_maskrcnn(arch: str = "maskrcnn_resnet50_fpn", weights: str | None = None,
                   checkpoint: str | None = None, **kwargs) -> nn.Module:
    """torchvision ``maskrcnn_resnet50_fpn`` (the paper's model) in eval mode.

    ``weights``: a torchvision enum name (``COCO_V1``), downloaded where the
    network allows; ``checkpoint``: a local state dict. Without either the
    model is randomly initialised (``weights_backbone=None``).
    """
    from classification.models import load_state_dict

    builders = {"maskrcnn_resnet50_fpn": torchvision.models.detection.maskrcnn_resnet50_fpn}
    if arch not in builders:
        raise ValueError(f"model.arch: unknown detection architecture {arch!r}; expected one of {sorted(builders)}")
    kwargs.setdefault("weights_backbone", None)
    if checkpoint:
        model = builders[arch](weights=None, **kwargs)
        model.load_state_dict(load_state_dict(checkpoint))
    elif weights:
        enum = torchvision.models.get_model_weights(builders[arch])
        try:
            w = enum[weights]
        except KeyError:
            raise ValueError(f"model.weights: {weights!r} is not one of {[e.name for e in enum]}") from None
        try:
            model = builders[arch](weights=w, **kwargs)
        except Exception as e:
            raise RuntimeError(
                f"could not download the {arch} weights {weights} ({type(e).__name__}: {e}). Offline, download "
                f"{w.url} elsewhere and pass it with --set model.checkpoint=/path/to/file.pth") from e
    else:
        model = builders[arch](weights=None, **kwargs)
    return model.eval()
