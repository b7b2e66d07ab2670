"""`bgd demo --quick`: the end-to-end demo on a local Ray cluster, with its targets asserted."""

import json

import pytest
from PIL import Image

from bgd_dist import load_compressed
from bgd_dist.cli import main
from detection.demo import MIN_RATIO, MIN_RELATIVE_AP, MIN_TEACHER_BOX_AP, TEACHER, TEACHER_SHA256, check_teacher


def test_the_committed_teacher_is_small_and_verified(tmp_path):
    assert TEACHER.stat().st_size <= 10 * 2 ** 20
    assert check_teacher() == TEACHER
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(TEACHER.read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match=TEACHER_SHA256):
        check_teacher(bad)


@pytest.mark.slow
def test_quick_demo_meets_the_targets(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "student" in printed and "MISSED" not in printed
    report = json.loads((out / "report.json").read_text())
    teacher, student = report["teacher"], report["student"]
    assert teacher["box_AP"] >= MIN_TEACHER_BOX_AP
    assert student["ratio"] >= MIN_RATIO
    assert student["box_AP"] >= MIN_RELATIVE_AP * teacher["box_AP"]
    assert student["mask_AP"] >= MIN_RELATIVE_AP * teacher["mask_AP"]
    assert report["targets_met"] and report["executor"] == "ray" and report["num_workers"] == 2
    assert set(report["seconds"]) >= {"data", "collect", "fit", "layerwise", "global", "eval_teacher",
                                      "eval_student", "total"}
    # the deliverables: compressed model, COCO results, the picture
    model = load_compressed(report["files"]["model"])
    assert model is not None
    detections = json.loads((out / "detections_student.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(detections[0])
    with Image.open(out / "predictions.png") as im:
        assert im.width > im.height / 4 and im.mode == "RGB"
    # a second run reuses the cached dataset
    stamp = (out / "shapes" / "instances_train.json").stat().st_mtime_ns
    from detection.demo import demo_config

    demo_config(out, quick=True)
    assert (out / "shapes" / "instances_train.json").stat().st_mtime_ns == stamp
