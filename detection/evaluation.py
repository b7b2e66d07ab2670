"""COCO evaluation (box and mask AP) with pycocotools, sharded and mergeable.

:class:`COCOEvaluator` follows detectron2's ``DatasetEvaluator``
(``reset / process / result``) plus ``state() / merge(states)``: every shard
turns its model outputs into COCO result entries (boxes as ``[x, y, w, h]``,
masks thresholded at 0.5 and RLE-encoded, labels mapped back to category ids),
the driver concatenates the shards' entries and runs ``COCOeval`` once per IoU
type over exactly the images the shards processed. The result holds the
standard 12-number summary of each type (``box_AP``, ``box_AP50`` ...,
``mask_ARl``); ``write_results`` writes the detections as a COCO results json.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .coco import load_coco

log = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = {"bbox": "box", "segm": "mask"}


def encode_masks(masks: torch.Tensor, threshold: float = 0.5) -> list[dict]:
    """(N, 1, H, W) or (N, H, W) probabilities -> N compressed RLEs (``counts`` as str)."""
    from pycocotools import mask as mask_utils

    if masks.dim() == 4:
        masks = masks[:, 0]
    binary = (masks > threshold).to(torch.uint8).cpu().numpy()
    rles = []
    for m in binary:
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles


def to_coco_results(image_id: int, output: dict, label_to_category: dict[int, int],
                    mask_threshold: float = 0.5) -> list[dict]:
    """One image's torchvision detections -> COCO result entries."""
    boxes = output["boxes"].detach().cpu().to(torch.float64)
    scores = output["scores"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    rles = encode_masks(output["masks"], mask_threshold) if "masks" in output else [None] * len(scores)
    out = []
    for box, score, label, rle in zip(boxes.tolist(), scores, labels, rles):
        if label not in label_to_category:
            continue  # a class the dataset does not have
        x0, y0, x1, y1 = box
        entry = {"image_id": int(image_id), "category_id": int(label_to_category[label]),
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)}
        if rle is not None:
            entry["segmentation"] = rle
        out.append(entry)
    return out


class COCOEvaluator:
    """Box and mask AP of detections on a COCO annotation file; mergeable across shards.

    ``process(batch, outputs)``: ``batch["image_ids"]`` and the model's list of
    detections (``boxes`` xyxy in image pixels, ``labels``, ``scores``, ``masks``
    (N, 1, H, W) probabilities).
    """

    def __init__(self, annotations: str, label_to_category: dict[int, int], iou_types=("bbox", "segm"),
                 mask_threshold: float = 0.5):
        unknown = set(iou_types) - set(IOU_TYPES)
        if unknown:
            raise ValueError(f"unknown iou types {sorted(unknown)}; expected bbox and/or segm")
        self.annotations = annotations
        self.label_to_category = dict(label_to_category)
        self.iou_types = tuple(iou_types)
        self.mask_threshold = mask_threshold
        self.summary = ""
        self.reset()

    def reset(self) -> None:
        self.image_ids: list[int] = []
        self.results: list[dict] = []

    def process(self, batch, outputs) -> None:
        for image_id, output in zip(batch["image_ids"], outputs):
            self.image_ids.append(int(image_id))
            self.results.extend(to_coco_results(image_id, output, self.label_to_category, self.mask_threshold))

    def state(self) -> dict:
        return {"image_ids": list(self.image_ids), "results": list(self.results)}

    def merge(self, states: list[dict]) -> None:
        for s in states:
            self.image_ids.extend(s["image_ids"])
            self.results.extend(s["results"])

    def write_results(self, path: str | Path) -> Path:
        """The detections as a COCO results json (``loadRes``-ready), sorted by image id."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sorted(self.results, key=lambda r: (r["image_id"], -r["score"]))))
        return path

    def _detections(self, gt, iou_type: str):
        """The results as a COCO object (an empty one when there are no detections)."""
        results = [r for r in self.results if iou_type == "bbox" or "segmentation" in r]
        if results:
            with contextlib.redirect_stdout(io.StringIO()):
                return gt.loadRes(copy.deepcopy(results))
        from pycocotools.coco import COCO

        empty = COCO()
        empty.dataset = {"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                         "annotations": []}
        with contextlib.redirect_stdout(io.StringIO()):
            empty.createIndex()
        return empty

    def result(self) -> dict:
        """``{"box_AP": ..., ..., "mask_ARl": ..., "n_images": int, "n_detections": int}``; the
        summaries are logged and kept in ``self.summary``."""
        from pycocotools.cocoeval import COCOeval

        gt = load_coco(self.annotations)
        image_ids = sorted(set(self.image_ids))
        out: dict = {}
        summaries = []
        for iou_type in self.iou_types:
            prefix = IOU_TYPES[iou_type]
            if not image_ids:
                out.update({f"{prefix}_{n}": -1.0 for n in STAT_NAMES})
                continue
            evaluator = COCOeval(gt, self._detections(gt, iou_type), iou_type)
            evaluator.params.imgIds = image_ids
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            lines = [l for l in buffer.getvalue().splitlines() if l.strip().startswith("Average")]
            summaries.append(f"{iou_type} ({len(image_ids)} images, {len(self.results)} detections):\n"
                             + "\n".join(lines))
            out.update({f"{prefix}_{n}": float(v) for n, v in zip(STAT_NAMES, evaluator.stats)})
        out["n_images"] = len(image_ids)
        out["n_detections"] = len(self.results)
        self.summary = "\n".join(summaries)
        for block in summaries:
            log.info("COCO evaluation, %s", block)
        return out
