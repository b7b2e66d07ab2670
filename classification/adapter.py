"""The classification adapter: torchvision classifiers, ImageNet-style folders, top-1/top-5."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bgd_dist.config import MISSING, from_mapping, require

from .models import build_classifier


@dataclass(frozen=True)
class ClassificationData:
    train: str | None = None          # ImageFolder root (ImageNet train/ layout) or a flat image folder
    val: str | None = None            # ImageFolder root with class sub-folders
    image_size: int = 224
    resize: int = 256
    num_workers: int = 0
    example_size: int = 224           # input size of the tracing example


class ClassificationAdapter:
    def __init__(self, model_config, data_config: dict | None = None):
        self.model_config = model_config
        self.data = from_mapping(ClassificationData, data_config or {}, "data")

    def build_model(self) -> nn.Module:
        m = self.model_config
        if m.checkpoint == MISSING:
            require(None, "model.checkpoint")
        return build_classifier(m.arch, m.weights, m.checkpoint, **m.kwargs)

    def arch(self) -> dict:
        return {"factory": "classification.models:build_classifier",
                "kwargs": {"arch": self.model_config.arch, **self.model_config.kwargs}}

    def example_batch(self, batch_size: int = 1) -> torch.Tensor:
        s = self.data.example_size
        return torch.zeros(batch_size, 3, s, s).normal_(generator=torch.Generator().manual_seed(0))

    def trace(self, model: nn.Module):
        model.eval()
        device = next(model.parameters()).device
        return model(self.example_batch().to(device))
