"""The synthetic COCO-format shapes dataset (bgd make-shapes)."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from bgd_dist.cli import main
from detection.coco import load_coco
from detection.shapes import make_shapes, render_image


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert main(["make-shapes", "--out", str(out), "--train", "12", "--val", "6", "--size", "64",
                 "--seed", "3"]) == 0
    return out


def test_make_shapes_writes_a_valid_coco_dataset(shapes):
    for split, n in (("train", 12), ("val", 6)):
        coco = load_coco(str(shapes / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square", "triangle"]
        assert len(coco.getAnnIds()) >= n
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(shapes / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) == (64, 64) and im.mode == "RGB"
        for ann in coco.loadAnns(coco.getAnnIds()):
            rle = coco.annToRLE(ann)
            m = mask_utils.decode(rle)
            assert m.sum() == ann["area"] > 0
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["iscrowd"] == 0


def test_masks_are_visible_parts_and_do_not_overlap(shapes):
    coco = load_coco(str(shapes / "instances_train.json"))
    occluded = 0
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))]
        total = np.sum(masks, axis=0)
        assert total.max() <= 1                          # visible parts are disjoint
        occluded += len(masks) > 1
    assert occluded > 0


def test_images_are_deterministic_and_extend_with_more_images(shapes, tmp_path):
    paths = make_shapes(tmp_path, n_train=14, n_val=0, size=64, seed=3)
    big = json.loads(open(paths["train_annotations"]).read())
    small = json.loads((shapes / "instances_train.json").read_text())
    assert big["annotations"][:len(small["annotations"])] == small["annotations"]
    a = np.asarray(Image.open(shapes / "train" / "000005.png"))
    b = np.asarray(Image.open(tmp_path / "train" / "000005.png"))
    assert np.array_equal(a, b)
    other, _ = render_image(4, "train", 5, 64)
    assert not np.array_equal(a, other)                   # the seed matters


def test_a_cached_split_is_kept(tmp_path):
    make_shapes(tmp_path, 3, 2, 64, 0)
    stamp = (tmp_path / "instances_val.json").stat().st_mtime_ns
    make_shapes(tmp_path, 3, 2, 64, 0)
    assert (tmp_path / "instances_val.json").stat().st_mtime_ns == stamp
    make_shapes(tmp_path, 3, 3, 64, 0)
    assert (tmp_path / "instances_val.json").stat().st_mtime_ns != stamp
