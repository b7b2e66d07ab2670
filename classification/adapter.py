"""The classification adapter: torchvision classifiers, ImageNet-style folders, top-1/top-5.

Implements the adapter protocol of :mod:`bgd_dist.adapters`:

- calibration and distillation images come from ``data.train`` (ImageNet
  ``train/`` layout, or a flat folder of unlabelled images) with
  RandomResizedCrop(224) + horizontal flip + ImageNet normalisation; their
  labels are never read;
- evaluation reads ``data.val`` (ImageFolder layout) with Resize(256) +
  CenterCrop(224) + ImageNet normalisation and scores top-1 / top-5;
- the distillation loss is KL(teacher softmax || student log-softmax),
  batch mean (METHOD.md §4). With ``data.loss: supervised`` the loss is the
  cross-entropy on the training images' labels instead (``data.train`` in the
  ImageFolder layout, class index = sorted folder order, as torchvision's
  ImageNet weights expect), with ``both`` the KL term plus
  ``data.supervised_weight`` x the cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms as T

from bgd_dist.adapters import AdapterBase
from bgd_dist.config import MISSING, from_mapping, require
from bgd_dist.sharding import calibration_items, eval_items, train_items

from .data import IMAGENET_MEAN, IMAGENET_STD, SeededImages, batches_of, list_images, loader
from .evaluation import TopKEvaluator
from .models import build_classifier


@dataclass(frozen=True)
class ClassificationData:
    train: str | None = None          # ImageFolder root (ImageNet train/ layout) or a flat image folder
    val: str | None = None            # ImageFolder root with class sub-folders
    image_size: int = 224             # RandomResizedCrop / CenterCrop size
    resize: int = 256                 # evaluation: Resize(resize) then CenterCrop(image_size)
    crop_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop area range (torchvision default)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_workers: int = 0              # DataLoader worker processes per engine worker
    eval_batch_size: int = 64
    example_size: int = 224           # input size of the tracing example
    on_bad_image: str = "fail"        # an unreadable image: fail (naming it) | skip (log it, count it in the report)
    loss: str = "distill"             # distill (KL to the teacher) | supervised (labels' cross-entropy) | both
    supervised_weight: float = 1.0    # loss: both -> KL + supervised_weight x cross-entropy

    def __post_init__(self):
        check_loss(self.loss, self.supervised_weight)
        if self.image_size < 1 or self.resize < self.image_size:
            raise ValueError(f"need 1 <= image_size <= resize, got image_size={self.image_size}, "
                             f"resize={self.resize}")
        if self.num_workers < 0 or self.eval_batch_size < 1:
            raise ValueError("num_workers must be >= 0 and eval_batch_size >= 1")
        if self.on_bad_image not in ("fail", "skip"):
            raise ValueError(f"on_bad_image: expected fail or skip, got {self.on_bad_image!r}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")


LOSSES = ("distill", "supervised", "both")


def check_loss(loss: str, supervised_weight: float) -> None:
    """``data.loss`` / ``data.supervised_weight`` of a classification data section."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if not supervised_weight >= 0:
        raise ValueError(f"supervised_weight: must be >= 0, got {supervised_weight}")


@dataclass
class LabelledLogits:
    """A forward on a labelled distillation batch (``data.loss: supervised`` or ``both``): the
    logits and the batch's labels, for :meth:`ClassifierAdapter.distill_loss`."""

    logits: Tensor
    labels: Tensor


def kl_distill_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher softmax || student log-softmax), averaged over the batch. Logits: (N, C)."""
    return F.kl_div(F.log_softmax(student_logits, 1), F.softmax(teacher_logits, 1), reduction="batchmean")


def images_of(batch) -> Tensor:
    """The image tensor of a batch: the batch itself, or the first entry of ``(images, labels)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class ClassifierAdapter(AdapterBase):
    """What every image classifier shares: batches are images (calibration, distillation) or
    ``(images, labels)`` (evaluation; distillation with ``data.loss`` supervised or both), the
    network returns logits, the loss is the KL distillation loss (``data.loss``: or the labels'
    cross-entropy, or both), the evaluator scores top-1 / top-5. Subclasses provide the models
    and the data (``build_model``, ``arch``, ``example_batch`` and the batch streams)."""

    @property
    def loss_mode(self) -> str:
        return getattr(self.data, "loss", "distill")

    def example_batch(self, batch_size: int = 1) -> Tensor:
        raise NotImplementedError

    def trace(self, model: nn.Module):
        model.eval()
        device = next(model.parameters()).device
        return model(self.example_batch().to(device))

    def to_device(self, batch, device):
        if isinstance(batch, (tuple, list)):
            return (batch[0].to(device), *batch[1:])
        return batch.to(device)

    def batch_len(self, batch) -> int:
        return images_of(batch).shape[0]

    def forward(self, model: nn.Module, batch) -> Tensor | LabelledLogits:
        if self.loss_mode != "distill" and isinstance(batch, (tuple, list)):
            return LabelledLogits(model(batch[0]), batch[1])
        return model(images_of(batch))

    def predict(self, model: nn.Module, batch) -> Tensor:
        return model(images_of(batch))

    def distill_loss(self, student_out: Tensor | LabelledLogits, teacher_out: Tensor | LabelledLogits) -> Tensor:
        mode = self.loss_mode
        if mode == "distill":
            return kl_distill_loss(student_out, teacher_out)
        if not isinstance(student_out, LabelledLogits):
            raise ValueError(f"distill_loss: data.loss {mode!r} needs labelled distillation batches "
                             f"(images, labels); got unlabelled ones")
        logits = student_out.logits
        supervised = F.cross_entropy(logits, student_out.labels.to(logits.device))
        if mode == "supervised":
            return supervised
        return kl_distill_loss(logits, teacher_out.logits) + self.data.supervised_weight * supervised

    def evaluator(self) -> TopKEvaluator:
        return TopKEvaluator((1, 5))


class ClassificationAdapter(ClassifierAdapter):
    """Adapter protocol over a torchvision classifier and ImageNet-style image folders."""

    def __init__(self, model_config, data_config: dict | None = None):
        self.model_config = model_config
        self.data = from_mapping(ClassificationData, data_config or {}, "data")
        self._train = None
        self._val = None
        self._skipped: set[str] = set()

    # -- models ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        m = self.model_config
        if m.checkpoint == MISSING:
            require(None, "model.checkpoint")
        return build_classifier(m.arch, m.weights, m.checkpoint, **m.kwargs)

    def arch(self) -> dict:
        return {"factory": "classification.models:build_classifier",
                "kwargs": {"arch": self.model_config.arch, **self.model_config.kwargs}}

    def example_batch(self, batch_size: int = 1) -> Tensor:
        s = self.data.example_size
        return torch.zeros(batch_size, 3, s, s).normal_(generator=torch.Generator().manual_seed(0))

    def preprocessing(self) -> dict:
        d = self.data
        return {"input_size": [3, d.image_size, d.image_size], "image": "RGB, values in [0, 1]",
                "resize": d.resize, "interpolation": "bilinear", "center_crop": d.image_size,
                "mean": list(d.mean), "std": list(d.std)}

    def class_names(self) -> list[str] | None:
        """The torchvision weights' categories (human-readable) when the teacher is a published
        checkpoint, else the class folders of ``data.val`` when it is there."""
        m = self.model_config
        num_classes = int(m.kwargs.get("num_classes", 1000))
        if m.weights and not m.checkpoint:
            import torchvision

            names = torchvision.models.get_model_weights(m.arch)[m.weights].meta.get("categories")
            if names and len(names) == num_classes:
                return list(names)
        val = self.data.val
        if isinstance(val, str) and Path(val).is_dir():
            _, classes = list_images(val, "data.val", labelled=True)
            if len(classes) == num_classes:
                return list(classes)
        return None

    # -- data -----------------------------------------------------------------------------------
    def data_paths(self) -> dict[str, str]:
        """The folders and files this adapter reads (each node checks them before it starts)."""
        paths = {"data.train": self.data.train, "data.val": self.data.val,
                 "model.checkpoint": self.model_config.checkpoint}
        return {k: v for k, v in paths.items() if v and v != MISSING}

    def train_transform(self):
        d = self.data
        return T.Compose([T.RandomResizedCrop(d.image_size, scale=d.crop_scale), T.RandomHorizontalFlip(),
                          T.ToTensor(), T.Normalize(d.mean, d.std)])

    def eval_transform(self):
        d = self.data
        return T.Compose([T.Resize(d.resize), T.CenterCrop(d.image_size), T.ToTensor(), T.Normalize(d.mean, d.std)])

    def train_set(self) -> SeededImages:
        """The training images, listed once per process: labels dropped, unless ``data.loss``
        needs them (then ``data.train`` must have class sub-folders)."""
        if self._train is None:
            root = require(self.data.train, "data.train")
            samples, classes = list_images(root, "data.train", labelled=False)
            labelled = self.data.loss != "distill"
            if labelled and not classes:
                raise ValueError(f"data.loss: {self.data.loss!r} needs labelled training images, but data.train "
                                 f"({root}) has no class sub-folders (ImageFolder layout, one sub-folder per "
                                 f"class); use data.loss: distill")
            self._train = SeededImages(samples if labelled else [(p, -1) for p, _ in samples],
                                       self.train_transform(), with_labels=labelled,
                                       skip_bad=self.data.on_bad_image == "skip")
        return self._train

    def val_set(self) -> SeededImages:
        if self._val is None:
            root = require(self.data.val, "data.val")
            samples, _ = list_images(root, "data.val", labelled=True)
            self._val = SeededImages(samples, self.eval_transform(), with_labels=True,
                                     skip_bad=self.data.on_bad_image == "skip")
        return self._val

    def calibration_batches(self, shard: int, n_shards: int, n_images: int, batch_size: int,
                            seed: int, start: int = 0) -> Iterator[Tensor]:
        dataset = self.train_set()
        idx, seeds = calibration_items(len(dataset), shard, n_shards, n_images, seed, start)
        keys = list(zip(idx.tolist(), seeds.tolist()))
        yield from loader(dataset, batches_of(keys, batch_size), self.data.num_workers, self._skipped)

    def train_batches(self, shard: int, n_shards: int, batch_size: int, seed: int,
                      start_step: int = 0) -> Iterator[Tensor]:
        dataset = self.train_set()
        keys = (list(zip(idx.tolist(), seeds.tolist()))
                for idx, seeds in train_items(len(dataset), shard, n_shards, batch_size, seed, start_step))
        yield from loader(dataset, keys, self.data.num_workers, self._skipped)

    def eval_batches(self, shard: int, n_shards: int, max_images: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        dataset = self.val_set()
        keys = eval_items(len(dataset), shard, n_shards, max_images).tolist()
        for images, labels in loader(dataset, batches_of(keys, self.data.eval_batch_size), self.data.num_workers,
                                     self._skipped):
            yield images, labels

    def skipped_items(self) -> list[str]:
        return sorted(self._skipped)
