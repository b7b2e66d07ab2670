"""A synthetic COCO-format instance segmentation dataset: coloured shapes with occlusion.

``make_shapes(out, n_train, n_val, size, seed)`` writes::

    out/train/000000.png ...        RGB images, size x size
    out/val/000000.png ...
    out/instances_train.json        COCO instances: images, annotations, categories
    out/instances_val.json

Each image has a smooth, noisy background and 1-4 shapes (circle, square,
triangle) of random colour, size and rotation, drawn in order so later shapes
occlude earlier ones. An annotation is the *visible* part of its shape: the
mask is an RLE (``segmentation: {"size": [h, w], "counts": str}``), the box the
visible mask's extent. Placements that would leave an earlier shape less than
half visible are re-drawn, so every painted shape is annotated. Image ``i`` of
a split depends only on ``(seed, split, i, size)``: a larger dataset extends a
smaller one.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

log = logging.getLogger(__name__)

CATEGORIES = ({"id": 1, "name": "circle", "supercategory": "shape"},
              {"id": 2, "name": "square", "supercategory": "shape"},
              {"id": 3, "name": "triangle", "supercategory": "shape"})
FORMAT_VERSION = 1
_SPLIT_ID = {"train": 0, "val": 1}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 1]: a colour, a linear gradient and mild noise."""
    base = rng.uniform(0.1, 0.9, 3)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-9
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    ramp = (xx * direction[0] + yy * direction[1])[..., None] * rng.uniform(-0.3, 0.3, 3)
    noise = rng.normal(0, 0.03, (size, size, 3))
    return np.clip(base + ramp + noise, 0, 1)


def _shape_mask(kind: int, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """(size, size) bool mask of one shape (category id ``kind``)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if kind == 1:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    else:
        n = 4 if kind == 2 else 3
        r = radius * (1.0 if kind == 2 else 1.15)
        pts = [(cx + r * math.cos(angle + 2 * math.pi * j / n), cy + r * math.sin(angle + 2 * math.pi * j / n))
               for j in range(n)]
        draw.polygon(pts, fill=1)
    return np.asarray(img, dtype=bool)


def _colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour that contrasts with the mean background colour."""
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(50):
        c = rng.uniform(0, 1, 3)
        if np.abs(c - mean).sum() > 0.6:
            return c
    return 1.0 - mean


def render_image(seed: int, split: str, index: int, size: int = 128) -> tuple[np.ndarray, list[dict]]:
    """One image (uint8, (size, size, 3)) and its objects ``[{"category_id", "mask"}]``, deterministic."""
    rng = np.random.default_rng([seed, _SPLIT_ID[split], index, size])
    image = _background(rng, size)
    n_objects = int(rng.integers(1, 5))
    objects: list[dict] = []          # visible masks so far, in drawing order
    scale = size / 128
    for _ in range(n_objects):
        for _attempt in range(20):
            kind = int(rng.integers(1, 4))
            radius = rng.uniform(8, 26) * scale
            cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
            full = _shape_mask(kind, cx, cy, radius, rng.uniform(0, 2 * math.pi), size)
            if full.sum() < 40 * scale ** 2:
                continue
            ok = all((o["mask"] & ~full).sum() >= 0.5 * o["area_full"] for o in objects)
            if ok:
                break
        else:
            continue
        for o in objects:
            o["mask"] = o["mask"] & ~full
        colour = _colour(rng, image)
        shade = 1 + rng.uniform(-0.15, 0.15) * (np.mgrid[0:size, 0:size][0] / size - 0.5)[..., None]
        image = np.where(full[..., None], np.clip(colour * shade, 0, 1), image)
        objects.append({"category_id": kind, "mask": full, "area_full": int(full.sum())})
    image = np.clip(image + rng.normal(0, 0.01, image.shape), 0, 1)
    return (image * 255).round().astype(np.uint8), [{"category_id": o["category_id"], "mask": o["mask"]}
                                                     for o in objects if o["mask"].any()]


def encode_mask(mask: np.ndarray) -> dict:
    """A bool (h, w) mask -> COCO compressed RLE with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _write_split(out: Path, split: str, n: int, size: int, seed: int) -> Path:
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        pixels, objects = render_image(seed, split, i, size)
        name = f"{i:06d}.png"
        Image.fromarray(pixels).save(folder / name)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for o in objects:
            rle = encode_mask(o["mask"])
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": o["category_id"],
                "segmentation": rle, "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            })
    dataset = {"info": {"description": "bgd-dist synthetic shapes", "version": FORMAT_VERSION, "split": split,
                        "n_images": n, "size": size, "seed": seed},
               "licenses": [], "images": images, "annotations": annotations, "categories": list(CATEGORIES)}
    path = out / f"instances_{split}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dataset))
    tmp.replace(path)
    return path


def shapes_info(out: str | Path, split: str) -> dict | None:
    """The ``info`` of an existing split's annotation file, or None."""
    path = Path(out) / f"instances_{split}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("info")
    except (OSError, json.JSONDecodeError):
        return None


def make_shapes(out: str | Path, n_train: int = 400, n_val: int = 100, size: int = 128, seed: int = 0,
                cached: bool = True) -> dict:
    """Write the dataset under ``out`` (see the module docstring); returns the data paths as the
    ``data`` section of a pipeline (train_images, train_annotations, val_images, val_annotations).

    ``cached``: a split whose annotation file already records the same parameters is kept.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        want = {"description": "bgd-dist synthetic shapes", "version": FORMAT_VERSION, "split": split,
                "n_images": n, "size": size, "seed": seed}
        if cached and shapes_info(out, split) == want:
            log.info("shapes %s split: %d images cached in %s", split, n, out)
            continue
        _write_split(out, split, n, size, seed)
        log.info("shapes %s split: wrote %d images to %s", split, n, out / split)
    return shapes_paths(out)


def shapes_paths(out: str | Path) -> dict:
    out = Path(out).resolve()
    return {"train_images": str(out / "train"), "train_annotations": str(out / "instances_train.json"),
            "val_images": str(out / "val"), "val_annotations": str(out / "instances_val.json")}


def make_shapes_main(args) -> int:
    """``bgd make-shapes --out DIR --train N --val M --size S --seed S``."""
    from pycocotools.coco import COCO

    paths = make_shapes(args.out, args.train, args.val, args.size, args.seed, cached=False)
    for split in ("train", "val"):
        coco = COCO(paths[f"{split}_annotations"])  # validates the file
        log.info("%s: %d images, %d annotations, categories %s", paths[f"{split}_annotations"],
                 len(coco.getImgIds()), len(coco.getAnnIds()), [c["name"] for c in coco.loadCats(coco.getCatIds())])
    print(f"wrote {Path(args.out).resolve()}")
    return 0
