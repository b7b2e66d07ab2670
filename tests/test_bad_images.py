"""One unreadable image among many: named when it fails the run, counted when skipped."""

import pytest
import torch
from PIL import Image

from bgd_dist.adapters import DataError
from bgd_dist.config import ModelConfig
from bgd_dist.executor import SerialExecutor
from bgd_dist.messages import CollectRequest, LayerRequest
from bgd_dist.student import student_state
from classification.adapter import ClassificationAdapter

N_GOOD = 8


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A flat folder of 8 good PNGs, one corrupt and one truncated file."""
    root = tmp_path_factory.mktemp("bad")
    for i in range(N_GOOD):
        img = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(i))
        Image.fromarray((img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(root / f"good_{i}.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * 10)
    whole = (root / "good_0.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return root


def model_config():
    return ModelConfig("classification", "resnet18", kwargs={"num_classes": 3})


def data(root, **extra):
    return {"train": str(root), "val": str(root), "image_size": 16, "resize": 16, "example_size": 16, **extra}


def test_an_unreadable_image_fails_naming_the_file(images):
    adapter = ClassificationAdapter(model_config(), data(images))
    for name, why in (("corrupt.jpg", "cannot identify"), ("truncated.png", "truncated")):
        index = [p for p, _ in adapter.train_set().samples].index(str(images / name))
        with pytest.raises(DataError, match=f"{images / name}: cannot read the image.*{why}.*on_bad_image: skip"):
            adapter.train_set()[index]
    with pytest.raises(DataError, match=str(images)):
        list(adapter.calibration_batches(0, 1, 10, 4, seed=0))


def test_skipped_images_are_left_out_deterministically_and_listed(images, caplog):
    counts = []
    for workers in (0, 1):     # in this process and in a DataLoader worker process
        adapter = ClassificationAdapter(model_config(), data(images, on_bad_image="skip", num_workers=workers))
        batches = list(adapter.calibration_batches(0, 1, 10, 4, seed=0))
        counts.append([b.shape[0] for b in batches])
        assert adapter.skipped_items() == sorted([str(images / "corrupt.jpg"), str(images / "truncated.png")])
    assert counts[0] == counts[1] and sum(counts[0]) == N_GOOD
    assert "corrupt.jpg: unreadable image skipped" in caplog.text
    with pytest.raises(ValueError, match="on_bad_image"):
        ClassificationAdapter(model_config(), data(images, on_bad_image="ignore"))


def test_the_executor_reports_the_skipped_files(images):
    ex = SerialExecutor(num_shards=2)
    ex.start(model_config(), data(images, on_bad_image="skip"))
    ex.load_student(student_state(ex.worker.teacher))
    fc = ex.worker.teacher.fc
    from bgd_dist.core.layouts import geometry_of

    result = ex.collect(CollectRequest([LayerRequest("fc", geometry_of(fc), 4, "gram")], 10, 4, seed=0))
    assert result.n_images == N_GOOD
    assert ex.skipped_items() == sorted([str(images / "corrupt.jpg"), str(images / "truncated.png")])


def test_under_ray_the_error_names_the_file_without_a_remote_traceback(ray_cluster, images):
    from bgd_dist.distributed.ray_executor import RayExecutor
    from bgd_dist.core.layouts import geometry_of

    ex = RayExecutor(num_workers=2)
    try:
        ex.start(model_config(), data(images))
        teacher = ClassificationAdapter(model_config(), data(images)).build_model()
        ex.load_student(student_state(teacher))
        with pytest.raises(DataError) as info:
            ex.collect(CollectRequest([LayerRequest("fc", geometry_of(teacher.fc), 4, "gram")], 10, 4, seed=0))
        message = str(info.value)
        assert str(images) in message and "cannot read the image" in message and "Traceback" not in message
    finally:
        ex.close()


def test_detection_names_the_file_or_skips_it(tmp_path):
    from bgd_dist.adapters import make_adapter
    from detection.shapes import make_shapes
    from detection.testing import tiny_config

    paths = make_shapes(tmp_path / "shapes", n_train=6, n_val=4, size=48, seed=0)
    cfg = tiny_config(paths)
    adapter = make_adapter(cfg.model, cfg.data)
    split = adapter._split("train")
    bad = split.entries[2][1]
    bad.write_bytes(bad.read_bytes()[:60])                                      # truncated
    with pytest.raises(DataError, match=f"{bad}.*on_bad_image: skip"):
        list(adapter.calibration_batches(0, 1, 6, 3, seed=0))
    skipping = make_adapter(cfg.model, {**cfg.data, "on_bad_image": "skip"})
    counts = [[len(b) for b in skipping.calibration_batches(0, 1, 6, 3, seed=0)] for _ in range(2)]
    assert counts[0] == counts[1] and sum(counts[0]) == 5
    assert skipping.skipped_items() == [str(bad)]
