"""The Mask R-CNN adapter (torchvision)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bgd_dist.config import MISSING, from_mapping, require

from .models import build_maskrcnn


@dataclass(frozen=True)
class DetectionData:
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    num_workers: int = 0
    example_size: int = 128


class MaskRCNNAdapter:
    def __init__(self, model_config, data_config: dict | None = None):
        self.model_config = model_config
        self.data = from_mapping(DetectionData, data_config or {}, "data")

    def build_model(self) -> nn.Module:
        m = self.model_config
        if m.checkpoint == MISSING:
            require(None, "model.checkpoint")
        return build_maskrcnn(m.arch, m.weights, m.checkpoint, **m.kwargs)

    def arch(self) -> dict:
        return {"factory": "detection.models:build_maskrcnn",
                "kwargs": {"arch": self.model_config.arch, **self.model_config.kwargs}}

    def example_batch(self) -> list[torch.Tensor]:
        s = self.data.example_size
        return [torch.rand(3, s, s, generator=torch.Generator().manual_seed(0))]

    def trace(self, model: nn.Module):
        """One forward in eval mode that reaches every head: the score threshold is
        lowered for the trace so the mask branch runs even on a random model."""
        model.eval()
        device = next(model.parameters()).device
        roi = model.roi_heads
        saved = roi.score_thresh, roi.detections_per_img
        roi.score_thresh, roi.detections_per_img = -1.0, 8
        try:
            return model([x.to(device) for x in self.example_batch()])
        finally:
            roi.score_thresh, roi.detections_per_img = saved
