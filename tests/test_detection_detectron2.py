"""The detectron2 adapter (mask_rcnn_R_50_FPN_3x through detectron2's API). Skipped without detectron2."""

import copy

import pytest
import torch

from bgd_dist.config import ModelConfig, pipeline_from_dict
from detection.detectron2_adapter import INSTALL_HINT, PAPER_RULES, detectron2_available

needs_detectron2 = pytest.mark.skipif(not detectron2_available(),
                                      reason="detectron2 is not installed (not on PyPI; install it from source)")


@pytest.mark.skipif(detectron2_available(), reason="detectron2 is installed")
def test_without_detectron2_the_adapter_says_how_to_install_it():
    from bgd_dist.adapters import adapter_class

    cls = adapter_class("detectron2")        # importing the module never needs detectron2
    with pytest.raises(ImportError, match="not on PyPI"):
        cls(ModelConfig("detectron2", "mask_rcnn_R_50_FPN_3x"), {})
    assert "install" in INSTALL_HINT


@pytest.fixture(scope="module")
def d2(tmp_path_factory):
    from bgd_dist.adapters import make_adapter, plan_for
    from detection.shapes import make_shapes

    data = make_shapes(tmp_path_factory.mktemp("shapes"), n_train=6, n_val=3, size=64, seed=0)
    cfg = pipeline_from_dict({
        "name": "d2", "model": {"adapter": "detectron2", "arch": "mask_rcnn_R_50_FPN_3x",
                                "kwargs": {"num_classes": 3, "min_size_test": 64, "max_size_test": 64}},
        "data": {**data, "example_size": 64, "distill": {"box_rois": 16, "mask_rois": 2}},
        "quantize": {"rules": PAPER_RULES}})
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model()
    return cfg, adapter, teacher, plan_for(cfg, teacher, adapter)


@needs_detectron2
def test_detectron2_plan_reaches_every_head(d2):
    cfg, adapter, teacher, plan = d2
    assert all(l.traced for l in plan.layers)
    names = [l.name for l in plan.layers]
    assert "backbone.bottom_up.res2.0.conv1.conv" in names           # unfused conv + norm
    assert plan.layer("backbone.bottom_up.stem.conv1.conv").skip
    assert plan.layer("roi_heads.box_head.fc1").block_size == 16
    assert plan.layer("roi_heads.mask_head.deconv").geometry.kind == "conv_transpose2d"


@needs_detectron2
def test_detectron2_distillation_and_round_trip(d2, tmp_path):
    from bgd_dist import load_compressed
    from bgd_dist.core.kmeans import fit_codebook
    from bgd_dist.fileformat import save_compressed
    from bgd_dist.nn.modules import get_submodule, pq_layers, quantize_

    cfg, adapter, teacher, plan = d2
    batch = next(adapter.calibration_batches(0, 1, 2, 2, seed=0))
    with torch.no_grad():
        target = adapter.forward(teacher, batch)
    assert float(adapter.distill_loss(adapter.forward(copy.deepcopy(teacher), batch), target)) == \
        pytest.approx(0.0, abs=1e-5)
    codebooks = {l.name: fit_codebook(get_submodule(teacher, l.name).weight.detach(), l.geometry, None,
                                      l.n_centroids, l.block_size, 2) for l in plan.quantized}
    student = quantize_(copy.deepcopy(teacher), plan, codebooks)
    with torch.no_grad():
        for layer in pq_layers(student).values():
            layer.centroids.copy_(layer.centroids.half().float())
    loss = adapter.distill_loss(adapter.forward(student, batch), target)
    loss.backward()
    assert float(loss) > 0
    save_compressed(tmp_path / "d2.bgd", student, plan, adapter.arch())
    loaded = load_compressed(tmp_path / "d2.bgd")
    a, b = adapter.predict(student, batch), adapter.predict(loaded, batch)
    for x, y in zip(a, b):
        for k in ("boxes", "labels", "scores", "masks"):
            torch.testing.assert_close(x[k], y[k])
