"""A real-data check that runs anywhere: scikit-learn's handwritten digits.

No ImageNet here, so the whole path (statistics, codebooks, distillation on
Ray, file format, evaluation) is proven on a real dataset that ships with
scikit-learn: 1797 real 8x8 grey-level digits, upsampled (bilinear) to
``image_size`` pixels, split once into 1397 training images (unlabelled for
the compression, like ImageNet ``train/``, unless ``data.loss`` asks for
them) and 400 held-out images (the evaluation set; labels used for scoring only).

- :func:`digits_resnet`: a small ResNet (torchvision naming: ``conv1``,
  ``layerN.M.convK``, ``layerN.0.downsample.0``, ``fc``), the architecture
  factory written into compressed files.
- :func:`train_digits_teacher`: a seeded, supervised training of the teacher
  (well under a minute on 2 cores), cached on disk (one training per recipe,
  guarded by a file lock so concurrent workers wait instead of retraining).
- :class:`DigitsAdapter`: the adapter protocol over the two, registered in
  pipelines by import path ``classification.digits:DigitsAdapter``.

Augmentation for calibration and distillation is the digits' analogue of
RandomResizedCrop: a random crop box (area in ``crop_scale``, aspect in
[3/4, 4/3]) resampled to ``image_size``; no flip (it changes the class).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgd_dist.config import MISSING, from_mapping, require
from bgd_dist.io import atomic_write
from bgd_dist.photos import CALIBRATION_SOURCES, photo_crop
from bgd_dist.sharding import calibration_items, chunks, eval_items, item_seed, train_items

from .adapter import ClassifierAdapter, check_loss
from .models import load_state_dict

log = logging.getLogger(__name__)

N_DIGITS = 1797
N_CLASSES = 10
RECIPE_VERSION = 1      # bump when the training code changes: invalidates cached teachers


# -- data ------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def digit_arrays() -> tuple[Tensor, Tensor]:
    """All 1797 digits: ``(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits check needs scikit-learn (it ships the dataset): "
                          "pip install scikit-learn, or pip install -e '.[dev]'") from None
    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(d.target, dtype=torch.int64)
    return images, labels


def split_indices(n_heldout: int = 400, split_seed: int = 0) -> tuple[Tensor, Tensor]:
    """The fixed, seeded split: ``(train indices, held-out indices)`` into :func:`digit_arrays`."""
    if not 0 < n_heldout < N_DIGITS:
        raise ValueError(f"data.n_heldout must be in (0, {N_DIGITS}), got {n_heldout}")
    order = torch.randperm(N_DIGITS, generator=torch.Generator().manual_seed(split_seed))
    return order[:N_DIGITS - n_heldout], order[N_DIGITS - n_heldout:]


def crop_boxes(seeds: list[int], scale: tuple[float, float]) -> Tensor:
    """One random crop box per seed, as affine parameters ``(N, 2, 3)`` in normalised coordinates.

    Area fraction uniform in ``scale``, log-aspect uniform in [log 3/4, log 4/3],
    position uniform inside the image.
    """
    theta = torch.zeros(len(seeds), 2, 3)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    for row, s in enumerate(seeds):
        u = torch.rand(4, generator=torch.Generator().manual_seed(int(s))).tolist()
        area = scale[0] + (scale[1] - scale[0]) * u[0]
        aspect = math.exp(lo + (hi - lo) * u[1])
        w = min(1.0, math.sqrt(area * aspect))
        h = min(1.0, math.sqrt(area / aspect))
        theta[row, 0, 0], theta[row, 1, 1] = w, h
        theta[row, 0, 2] = (1 - w) * (2 * u[2] - 1)
        theta[row, 1, 2] = (1 - h) * (2 * u[3] - 1)
    return theta


def render(images: Tensor, size: int, theta: Tensor | None = None) -> Tensor:
    """8x8 digits ``(N, 8, 8)`` in [0, 1] -> normalised network inputs ``(N, 1, size, size)``.

    Without ``theta`` the whole image is upsampled (bilinear); with ``theta``
    (``(N, 2, 3)``, see :func:`crop_boxes`) the box is resampled.
    """
    x = images.unsqueeze(1)
    if theta is None:
        theta = torch.eye(2, 3).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, [len(images), 1, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (out - 0.5) / 0.5


# -- the network ----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's ResNet basic block (3x3, 3x3, 1x1 downsample when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class DigitsResNet(nn.Module):
    """conv1 (3x3) -> three stages of basic blocks (width, 2 width, 4 width; stride 1, 2, 2) -> fc."""

    def __init__(self, width: int = 32, blocks: tuple[int, int, int] = (1, 1, 1), num_classes: int = N_CLASSES,
                 in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c = width * 2 ** i
            stages.append(nn.Sequential(*[BasicBlock(c_in if j == 0 else c, c, 2 if (i and j == 0) else 1)
                                          for j in range(n)]))
            c_in = c
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def digits_resnet(width: int = 32, blocks: tuple[int, int, int] | list[int] = (1, 1, 1),
                  num_classes: int = N_CLASSES, in_channels: int = 1) -> DigitsResNet:
    """The digits network, untrained, in eval mode (the factory of compressed files)."""
    blocks = tuple(int(b) for b in blocks)
    if len(blocks) != 3 or min(blocks) < 1:
        raise ValueError(f"blocks must be three positive integers, got {blocks}")
    return DigitsResNet(width, blocks, num_classes, in_channels).eval()


# -- the teacher ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherRecipe:
    """Everything the teacher's weights depend on (the cache key)."""

    width: int = 32
    blocks: tuple[int, int, int] = (1, 1, 1)
    image_size: int = 16
    n_heldout: int = 400
    split_seed: int = 0
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_scale: tuple[float, float] = (0.6, 1.0)
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit_teacher(recipe: TeacherRecipe) -> nn.Module:
    """Supervised training of :func:`digits_resnet` on the training split (seeded, SGD + cosine)."""
    images, labels = digit_arrays()
    train_idx, _ = split_indices(recipe.n_heldout, recipe.split_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = digits_resnet(recipe.width, recipe.blocks)
    steps_per_epoch = math.ceil(len(train_idx) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=total, pct_start=0.15)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    model.train()
    step = 0
    for epoch in range(recipe.epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for start in range(0, len(perm), recipe.batch_size):
            idx = perm[start:start + recipe.batch_size]
            seeds = [item_seed(recipe.seed + 7 * epoch, step * recipe.batch_size + i) for i in range(len(idx))]
            x = render(images[idx], recipe.image_size, crop_boxes(seeds, recipe.crop_scale))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    return model.eval()


@torch.no_grad()
def heldout_accuracy(model: nn.Module, image_size: int = 16, n_heldout: int = 400, split_seed: int = 0) -> float:
    """Top-1 (percent) of ``model`` on the held-out split."""
    images, labels = digit_arrays()
    _, held = split_indices(n_heldout, split_seed)
    model.eval()
    pred = model(render(images[held], image_size)).argmax(1)
    return 100.0 * float((pred == labels[held]).float().mean())


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (POSIX); a no-op where fcntl is unavailable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def teacher_path(recipe: TeacherRecipe, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"digits_resnet_w{recipe.width}_{recipe.key()}.pt"


def train_digits_teacher(recipe: TeacherRecipe | None = None, cache_dir: str | Path | None = "runs/cache",
                         **overrides) -> nn.Module:
    """The trained teacher of ``recipe`` (fields may be given as keyword overrides), in eval mode.

    With a ``cache_dir`` the state dict is cached there (keyed by the recipe) and
    later calls, in any process, load it; a lock makes concurrent callers wait
    for one training instead of each training their own.
    """
    recipe = recipe or TeacherRecipe()
    if overrides:
        recipe = TeacherRecipe(**{**asdict(recipe), **overrides})
    if cache_dir is None:
        return fit_teacher(recipe)
    path = teacher_path(recipe, cache_dir)
    with _file_lock(path.with_name(path.name + ".lock")):
        if not path.is_file():
            start = time.perf_counter()
            model = fit_teacher(recipe)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            atomic_write(path, lambda f: torch.save(state, f))
            log.info("trained the digits teacher in %.1fs (held-out top-1 %.2f), cached at %s",
                     time.perf_counter() - start, heldout_accuracy(model, recipe.image_size, recipe.n_heldout,
                                                                    recipe.split_seed), path)
            return model
    model = digits_resnet(recipe.width, recipe.blocks)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


# -- the adapter -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsData:
    image_size: int = 16
    n_heldout: int = 400              # held-out (evaluation) images; the rest is the training split
    split_seed: int = 0
    crop_scale: tuple[float, float] = (0.6, 1.0)   # calibration / distillation crops (area range)
    eval_batch_size: int = 200
    cache_dir: str = "runs/cache"     # where the trained teacher is cached (absolute on a multi-node cluster)
    teacher_epochs: int = 20
    teacher_seed: int = 0
    loss: str = "distill"             # distill (KL to the teacher) | supervised (labels' cross-entropy) | both
    supervised_weight: float = 1.0    # loss: both -> KL + supervised_weight x cross-entropy
    calibration: str = "task"         # task (digit crops) | photos (crops of natural photographs, out of domain)

    def __post_init__(self):
        check_loss(self.loss, self.supervised_weight)
        if self.calibration not in CALIBRATION_SOURCES:
            raise ValueError(f"calibration: expected one of {CALIBRATION_SOURCES}, got {self.calibration!r}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        split_indices(self.n_heldout, self.split_seed)  # validates n_heldout


class DigitsAdapter(ClassifierAdapter):
    """Adapter protocol over :func:`digits_resnet` and the digits split (``model.arch: digits_resnet``).

    ``model.kwargs`` (``width``, ``blocks``) are the architecture's; ``model.checkpoint``
    loads a state dict instead of training (or reusing the cached) teacher.
    """

    def __init__(self, model_config, data_config: dict | None = None):
        self.model_config = model_config
        self.data = from_mapping(DigitsData, data_config or {}, "data")
        if model_config.arch != "digits_resnet":
            raise ValueError(f"model.arch: the digits adapter builds 'digits_resnet', got {model_config.arch!r}")
        if model_config.weights:
            raise ValueError("model.weights: the digits network has no published weights; leave it null "
                             "(the teacher is trained and cached) or pass model.checkpoint")
        unknown = set(model_config.kwargs) - {"width", "blocks"}
        if unknown:
            raise ValueError(f"model.kwargs: unknown keys {sorted(unknown)} (allowed: blocks, width)")
        self._train_idx, self._held_idx = split_indices(self.data.n_heldout, self.data.split_seed)

    def recipe(self) -> TeacherRecipe:
        d, kw = self.data, self.model_config.kwargs
        return TeacherRecipe(width=int(kw.get("width", 32)), blocks=tuple(kw.get("blocks", (1, 1, 1))),
                             image_size=d.image_size, n_heldout=d.n_heldout, split_seed=d.split_seed,
                             epochs=d.teacher_epochs, crop_scale=d.crop_scale, seed=d.teacher_seed)

    # -- models ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        ckpt = self.model_config.checkpoint
        if ckpt == MISSING:
            require(None, "model.checkpoint")
        if ckpt:
            model = digits_resnet(**self.model_config.kwargs)
            model.load_state_dict(load_state_dict(ckpt))
            return model.eval()
        return train_digits_teacher(self.recipe(), self.data.cache_dir)

    def arch(self) -> dict:
        return {"factory": "classification.digits:digits_resnet", "kwargs": dict(self.model_config.kwargs)}

    def data_paths(self) -> dict[str, str]:
        """The digits ship with scikit-learn; only a given teacher checkpoint is read from disk."""
        ckpt = self.model_config.checkpoint
        return {"model.checkpoint": ckpt} if ckpt and ckpt != MISSING else {}

    def example_batch(self, batch_size: int = 1) -> Tensor:
        images, _ = digit_arrays()
        return render(images[self._train_idx[:batch_size]], self.data.image_size)

    def preprocessing(self) -> dict:
        s = self.data.image_size
        return {"input_size": [1, s, s], "image": "8x8 grey digit, values in [0, 1], upsampled (bilinear)",
                "mean": [0.5], "std": [0.5]}

    def class_names(self) -> list[str]:
        return [str(i) for i in range(N_CLASSES)]

    # -- data -----------------------------------------------------------------------------------
    def _augmented(self, positions: Tensor, seeds: list[int]) -> Tensor:
        images, _ = digit_arrays()
        idx = self._train_idx[positions]
        return render(images[idx], self.data.image_size, crop_boxes(seeds, self.data.crop_scale))

    def _labels(self, positions: Tensor) -> Tensor:
        return digit_arrays()[1][self._train_idx[positions]]

    def calibration_batches(self, shard: int, n_shards: int, n_images: int, batch_size: int,
                            seed: int, start: int = 0) -> Iterator[Tensor]:
        idx, seeds = calibration_items(len(self._train_idx), shard, n_shards, n_images, seed, start)
        for i, s in zip(chunks(idx, batch_size), chunks(seeds, batch_size)):
            if self.data.calibration == "photos":   # 8x8 grey crops of photographs, rendered like digits
                yield render(torch.stack([photo_crop(int(v), 8, 8, grey=True)[0] for v in s]), self.data.image_size)
            else:
                yield self._augmented(i, s.tolist())

    def train_batches(self, shard: int, n_shards: int, batch_size: int, seed: int,
                      start_step: int = 0) -> Iterator[Tensor]:
        """Images, or ``(images, labels)`` when ``data.loss`` needs the labels."""
        labelled = self.data.loss != "distill"
        for idx, seeds in train_items(len(self._train_idx), shard, n_shards, batch_size, seed, start_step):
            x = self._augmented(idx, seeds.tolist())
            yield (x, self._labels(idx)) if labelled else x

    def eval_batches(self, shard: int, n_shards: int, max_images: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = digit_arrays()
        mine = self._held_idx[eval_items(len(self._held_idx), shard, n_shards, max_images)]
        for idx in chunks(mine, self.data.eval_batch_size):
            yield render(images[idx], self.data.image_size), labels[idx]

    def heldout(self) -> tuple[Tensor, Tensor]:
        """All held-out ``(images (400, 1, s, s), labels)`` (tests and benchmarks)."""
        images, labels = digit_arrays()
        return render(images[self._held_idx], self.data.image_size), labels[self._held_idx]
