"""COCO evaluation on a tiny inline COCO file: known AP values, empty detections, shards, label mapping."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from detection.coco import CocoImages, category_mapping, load_coco
from detection.evaluation import STAT_NAMES, COCOEvaluator

H, W = 48, 64
# category ids are not contiguous: label 1 <-> id 5, label 2 <-> id 9
RECTS = [  # (image_id, category_id, x, y, w, h)
    (1, 5, 4, 4, 12, 10),
    (1, 5, 30, 20, 20, 16),
    (1, 9, 8, 30, 14, 12),
    (2, 5, 10, 6, 18, 18),
    (2, 5, 40, 24, 16, 12),
]


def polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    anns = []
    for i, (image_id, cat, x, y, w, h) in enumerate(RECTS):
        anns.append({"id": i + 1, "image_id": image_id, "category_id": cat, "segmentation": polygon(x, y, w, h),
                     "area": float(w * h), "bbox": [x, y, w, h], "iscrowd": 0})
    data = {"images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                       {"id": 2, "file_name": "b.png", "width": W, "height": H}],
            "annotations": anns,
            "categories": [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]}
    path = root / "instances_tiny.json"
    path.write_text(json.dumps(data))
    return str(path)


def gt_outputs(coco_file, drop=()):
    """Perfect detections (the ground truth itself), as a model would return them."""
    coco = load_coco(coco_file)
    cat_to_label = {5: 1, 9: 2}
    outputs = {1: [], 2: []}
    for i, (image_id, cat, x, y, w, h) in enumerate(RECTS):
        if i in drop:
            continue
        mask = torch.from_numpy(coco.annToMask(coco.anns[i + 1])).float()
        outputs[image_id].append((torch.tensor([x, y, x + w, y + h], dtype=torch.float32), cat_to_label[cat], mask))
    out = []
    for image_id in (1, 2):
        dets = outputs[image_id]
        out.append({"boxes": torch.stack([d[0] for d in dets]) if dets else torch.zeros(0, 4),
                    "labels": torch.tensor([d[1] for d in dets], dtype=torch.int64),
                    "scores": torch.ones(len(dets)),
                    "masks": torch.stack([d[2] for d in dets])[:, None] if dets else torch.zeros(0, 1, H, W)})
    return out


def evaluate(coco_file, outputs, image_ids=(1, 2)):
    ev = COCOEvaluator(coco_file, category_mapping(coco_file, num_classes=3))
    ev.process({"image_ids": list(image_ids)}, outputs)
    return ev, ev.result()


def test_perfect_detections_give_ap_one(coco_file):
    _, r = evaluate(coco_file, gt_outputs(coco_file))
    assert r["box_AP"] == pytest.approx(1.0) and r["mask_AP"] == pytest.approx(1.0)
    assert r["box_AP50"] == pytest.approx(1.0) and r["mask_AR100"] == pytest.approx(1.0)
    assert set(r) >= {f"{p}_{n}" for p in ("box", "mask") for n in STAT_NAMES}
    assert r["n_images"] == 2 and r["n_detections"] == len(RECTS)


def test_one_missing_detection_gives_the_exact_ap(coco_file):
    # category 5 has 4 objects; without one of them recall stops at 0.75 with precision 1:
    # 76 of COCO's 101 recall thresholds (0, 0.01, ..., 0.75) -> AP 76/101; category 9 stays 1
    _, r = evaluate(coco_file, gt_outputs(coco_file, drop=(3,)))
    expected = (76 / 101 + 1.0) / 2
    assert r["box_AP"] == pytest.approx(expected, abs=1e-12)
    assert r["mask_AP"] == pytest.approx(expected, abs=1e-12)


def test_wrong_label_is_a_miss_so_the_mapping_matters(coco_file):
    outputs = gt_outputs(coco_file)
    outputs[0]["labels"][2] = 1   # the category-9 object reported as category 5
    _, r = evaluate(coco_file, outputs)
    assert r["box_AP"] < 0.9


def test_empty_detections_are_handled(coco_file):
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
              "masks": torch.zeros(0, 1, H, W)}] * 2
    _, r = evaluate(coco_file, empty)
    assert r["box_AP"] == 0.0 and r["mask_AP"] == 0.0 and r["n_detections"] == 0
    nothing = COCOEvaluator(coco_file, {1: 5, 2: 9}).result()   # no image processed at all
    assert nothing["n_images"] == 0 and nothing["box_AP"] == -1.0


def test_shards_merge_to_the_same_result_and_results_json_loads(coco_file, tmp_path):
    outputs = gt_outputs(coco_file, drop=(1,))
    _, whole = evaluate(coco_file, outputs)
    shards = []
    for i, image_id in enumerate((1, 2)):
        ev = COCOEvaluator(coco_file, {1: 5, 2: 9})
        ev.process({"image_ids": [image_id]}, [outputs[i]])
        shards.append(ev.state())
    driver = COCOEvaluator(coco_file, {1: 5, 2: 9})
    driver.merge(shards[::-1])
    assert driver.result() == whole
    # only the processed images count: image 1 alone
    _, one = evaluate(coco_file, [outputs[0]], image_ids=(1,))
    assert one["n_images"] == 1
    path = driver.write_results(tmp_path / "detections.json")
    results = json.loads(path.read_text())
    assert {r["category_id"] for r in results} == {5, 9}
    dt = load_coco(coco_file).loadRes(str(path))
    assert len(dt.anns) == len(RECTS) - 1
    rle = results[0]["segmentation"]
    assert mask_utils.area(rle) > 0 and isinstance(rle["counts"], str)


def test_category_mapping_modes(coco_file):
    assert category_mapping(coco_file, 3) == {1: 5, 2: 9}
    assert category_mapping(coco_file, 91) == {5: 5, 9: 9}          # torchvision's COCO label space
    with pytest.raises(ValueError, match="do not fit a model with 5 classes"):
        category_mapping(coco_file, 5)


def test_images_load_in_any_aspect_ratio_and_without_annotations(tmp_path):
    from PIL import Image

    for name, size in (("wide.png", (96, 40)), ("tall.jpg", (30, 80))):
        Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(tmp_path / name)
    images = CocoImages(str(tmp_path))
    assert len(images) == 2
    shapes = sorted(tuple(images.load(i).shape) for i in range(2))
    assert shapes == [(3, 40, 96), (3, 80, 30)]
    assert images.load(0).dtype == torch.float32 and float(images.load(0).max()) <= 1.0
