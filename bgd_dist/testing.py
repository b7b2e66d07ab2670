"""A tiny, fully synthetic adapter for tests and benchmarks of the engine.

A small seeded conv net (3x3, strided, grouped, 1x1 shortcut, linear head) and
deterministic synthetic images: nothing to download, identical in every
process, so the serial and Ray executors can be compared exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import AdapterBase, EvaluatorBase
from .config import from_mapping
from .sharding import calibration_items, chunks, eval_items, train_items


class ToyNet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.shortcut = nn.Conv2d(2 * width, 2 * width, 1, bias=False)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)) + self.shortcut(x))
        return self.fc(x.mean((2, 3)))


def toy_convnet(width: int = 16, num_classes: int = 10, seed: int = 0, poison: str | None = None,
                folded_bn: bool = False) -> nn.Module:
    """A seeded ToyNet with BN statistics of the synthetic data, in eval mode.

    ``poison``: a layer whose weight gets a NaN (tests of bad-input errors). ``folded_bn``: the
    BN statistics folded into the affine parameters (running mean 0, variance 1; same eval-mode
    function), as some imported checkpoints are.
    """
    gen = torch.Generator().manual_seed(seed)
    model = ToyNet(width, num_classes)
    with torch.no_grad():
        for p in model.parameters():
            scale = (2.0 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        model.fc.weight.mul_(4.0)  # confident teacher: a distillation signal worth following
        # BN statistics of the synthetic data, as a trained network would have
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        model.train()(synthetic_images(torch.arange(64), 16, seed))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
                m.num_batches_tracked.zero_()
        if poison:
            model.get_submodule(poison).weight.view(-1)[0] = float("nan")
    if folded_bn:
        from .batchnorm import fold_batchnorm

        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                fold_batchnorm(m)
    return model.eval()


def synthetic_images(indices: Tensor, size: int = 16, seed: int = 0) -> Tensor:
    """Deterministic images: image ``i`` depends only on ``(i, seed)``. (n, 3, size, size)."""
    out = torch.empty(len(indices), 3, size, size)
    for row, i in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        low = torch.randn(1, 3, 4, 4, generator=g)
        out[row] = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0] \
            + 0.1 * torch.randn(3, size, size, generator=g)
    return out


@dataclass(frozen=True)
class ToyData:
    n_images: int = 256        # size of the synthetic "training set"
    image_size: int = 16
    seed: int = 0
    data_dir: str | None = None   # declared as data (nothing is read there); $VARS expand on each node


class ToyAdapter(AdapterBase):
    """Adapter protocol (see :mod:`bgd_dist.adapters`) over :func:`toy_convnet`."""

    def __init__(self, model_config, data_config: dict | None = None):
        self.model_config = model_config
        self.data = from_mapping(ToyData, data_config or {}, "data")

    def build_model(self) -> nn.Module:
        return toy_convnet(**self.model_config.kwargs)

    def data_paths(self) -> dict[str, str]:
        """``data.data_dir`` with environment variables expanded in this process: tests give one
        Ray node a variable that points elsewhere, as a node without the shared file system."""
        return {"data.data_dir": os.path.expandvars(self.data.data_dir)} if self.data.data_dir else {}

    def arch(self) -> dict:
        return {"factory": "bgd_dist.testing:toy_convnet", "kwargs": dict(self.model_config.kwargs)}

    def trace(self, model: nn.Module):
        return model(synthetic_images(torch.arange(1), self.data.image_size, self.data.seed))

    def calibration_batches(self, shard: int, n_shards: int, n_images: int, batch_size: int,
                            seed: int, start: int = 0) -> Iterator[Tensor]:
        idx, _ = calibration_items(self.data.n_images, shard, n_shards, n_images, seed, start)
        for chunk in chunks(idx, batch_size):
            yield synthetic_images(chunk, self.data.image_size, self.data.seed)

    def train_batches(self, shard: int, n_shards: int, batch_size: int, seed: int,
                      start_step: int = 0) -> Iterator[Tensor]:
        """This shard's slice of each global batch; an image is flipped when its augmentation seed is odd."""
        for idx, seeds in train_items(self.data.n_images, shard, n_shards, batch_size, seed, start_step):
            x = synthetic_images(idx, self.data.image_size, self.data.seed)
            flip = (seeds % 2) == 1
            x[flip] = x[flip].flip(-1)
            yield x

    def to_device(self, batch: Tensor, device) -> Tensor:
        return batch.to(device)

    def batch_len(self, batch: Tensor) -> int:
        return batch.shape[0]

    def forward(self, model: nn.Module, batch: Tensor) -> Tensor:
        return model(batch)

    predict = forward

    def distill_loss(self, student_out: Tensor, teacher_out: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(student_out, 1), F.softmax(teacher_out, 1), reduction="batchmean")

    def evaluator(self):
        return AgreementEvaluator(dict(self.model_config.kwargs))

    def eval_batches(self, shard: int, n_shards: int, max_images: int | None) -> Iterator[Tensor]:
        for chunk in chunks(eval_items(self.data.n_images, shard, n_shards, max_images), 64):
            yield synthetic_images(chunk, self.data.image_size, self.data.seed)


class AgreementEvaluator(EvaluatorBase):
    """Top-1 agreement with labels produced by the (dense) toy teacher; mergeable."""

    def __init__(self, teacher_kwargs: dict | None = None):
        self.reset()
        self.teacher_kwargs = teacher_kwargs or {}
        self._teacher = None

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    def process(self, batch: Tensor, outputs: Tensor) -> None:
        if self._teacher is None:
            self._teacher = toy_convnet(**self.teacher_kwargs)
        with torch.no_grad():
            labels = self._teacher(batch.cpu()).argmax(1)
        self.correct += int((outputs.argmax(1).cpu() == labels).sum())
        self.total += len(labels)

    def state(self) -> dict:
        return {"correct": self.correct, "total": self.total}

    def merge(self, states: list[dict]) -> None:
        for s in states:
            self.correct += s["correct"]
            self.total += s["total"]

    def result(self) -> dict:
        return {"agreement": self.correct / max(self.total, 1), "n_images": self.total}
