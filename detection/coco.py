"""COCO-format data: an ``instances_*.json`` file and its image folder, read with pycocotools.

Images come back as float tensors (3, H, W) in [0, 1] at their own size and
aspect ratio (the model's transform resizes and batches them). Quantization
uses images only: with no annotation file, every image file of the folder is
used. Labels (for evaluation and the supervised option) are mapped between
COCO category ids and the model's contiguous class indexes by
:func:`category_mapping`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@lru_cache(maxsize=8)
def load_coco(annotations: str):
    """A pycocotools ``COCO`` index of ``annotations`` (cached per process, quiet)."""
    from pycocotools.coco import COCO

    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {annotations} does not exist")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


class CocoImages:
    """The images of one split in a fixed order (by image id, or by file name without annotations).

    ``entries[i] = (image_id, path)``; image ids are the COCO ids (or ``i + 1``
    for a bare folder).
    """

    def __init__(self, images_dir: str, annotations: str | None = None):
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"image folder {images_dir} does not exist")
        self.annotations = annotations
        if annotations:
            coco = load_coco(annotations)
            self.entries = [(i, self.images_dir / coco.imgs[i]["file_name"]) for i in sorted(coco.imgs)]
        else:
            files = sorted(p for p in self.images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            self.entries = [(i + 1, p) for i, p in enumerate(files)]
        if not self.entries:
            raise ValueError(f"no images in {images_dir}" + (f" listed by {annotations}" if annotations else ""))

    def __len__(self) -> int:
        return len(self.entries)

    def image_id(self, index: int) -> int:
        return self.entries[index][0]

    def load(self, index: int) -> Tensor:
        """(3, H, W) float32 in [0, 1]."""
        path = self.entries[index][1]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise OSError(f"cannot read image {path}: {e}") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)

    def target(self, index: int, category_to_label: dict[int, int]) -> dict[str, Tensor]:
        """Ground truth of image ``index`` in torchvision's format: boxes (N, 4) xyxy,
        labels (N,) int64, masks (N, H, W) uint8. Crowd annotations are skipped."""
        if not self.annotations:
            raise ValueError(f"labels requested but no annotation file is given for {self.images_dir}")
        coco = load_coco(self.annotations)
        image_id = self.image_id(index)
        info = coco.imgs[image_id]
        h, w = info["height"], info["width"]
        boxes, labels, masks = [], [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)):
            x, y, bw, bh = ann["bbox"]
            if bw < 1 or bh < 1 or ann["category_id"] not in category_to_label:
                continue
            boxes.append([x, y, x + bw, y + bh])
            labels.append(category_to_label[ann["category_id"]])
            masks.append(coco.annToMask(ann))
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.uint8)}


def category_mapping(annotations: str, num_classes: int, mode: str = "auto") -> dict[int, int]:
    """``{model label: COCO category id}`` for a model with ``num_classes`` outputs (background included).

    - ``contiguous``: label ``i`` is the ``i``-th category by id (detectron2 style; our models);
    - ``identity``: label == category id (torchvision's COCO models, 91 outputs);
    - ``auto``: contiguous when the model has one output per category plus background,
      identity when it has 91 and the ids fit.
    """
    coco = load_coco(annotations)
    cat_ids = sorted(coco.getCatIds())
    if mode == "auto":
        if num_classes - 1 == len(cat_ids):
            mode = "contiguous"
        elif num_classes == 91 and cat_ids and max(cat_ids) <= 90:
            mode = "identity"
        else:
            raise ValueError(f"{annotations}: {len(cat_ids)} categories do not fit a model with {num_classes} "
                             f"classes; set data.category_ids to contiguous or identity")
    if mode == "contiguous":
        if num_classes - 1 < len(cat_ids):
            raise ValueError(f"{annotations}: {len(cat_ids)} categories but the model has {num_classes - 1} "
                             f"foreground classes")
        return {i + 1: c for i, c in enumerate(cat_ids)}
    if mode == "identity":
        return {c: c for c in cat_ids}
    raise ValueError(f"data.category_ids: expected auto, contiguous or identity, got {mode!r}")
