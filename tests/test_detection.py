"""The Mask R-CNN adapter: plan, statistics, distillation loss, supervised option, data, round trips."""

import copy
import dataclasses

import pytest
import torch
import torchvision
from torch import nn

from bgd_dist import load_compressed
from bgd_dist.adapters import build_architecture, make_adapter, plan_for
from bgd_dist.config import load_pipeline
from bgd_dist.core.kmeans import fit_codebook
from bgd_dist.core.sizing import size_report
from bgd_dist.executor import SerialExecutor
from bgd_dist.fileformat import save_compressed
from bgd_dist.messages import CollectRequest, LayerRequest
from bgd_dist.sharding import eval_items
from bgd_dist.nn.modules import get_submodule, pq_layers, quantize_
from bgd_dist.plan import Plan
from bgd_dist.student import student_state
from detection.models import FrozenBatchNorm2d, build_maskrcnn
from detection.shapes import make_shapes
from detection.testing import tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=12, n_val=6, size=64, seed=0)


@pytest.fixture(scope="module")
def tiny(data):
    cfg = tiny_config(data)
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model()
    plan = plan_for(cfg, teacher, adapter)
    return cfg, adapter, teacher, plan


def quantized_copy(teacher, plan, names, n_centroids=None):
    """A copy of ``teacher`` with ``names`` quantized (weights-only k-means; ``n_centroids`` or the plan's K)."""
    student = copy.deepcopy(teacher)
    codebooks = {}
    for n in names:
        w = get_submodule(student, n).weight.detach()
        k = n_centroids or plan.layer(n).n_centroids
        codebooks[n] = fit_codebook(w, plan.layer(n).geometry, None, k, plan.layer(n).block_size, 3)
    return quantize_(student, plan, codebooks)


def round_centroids_to_fp16(model):
    """The file stores centroids in fp16 (METHOD §5): the in-memory student rounded the same way."""
    with torch.no_grad():
        for layer in pq_layers(model).values():
            layer.centroids.copy_(layer.centroids.half().float())
    return model


def sub_plan(plan, names):
    """``plan`` with every layer but ``names`` marked skip (an export of a partly quantized model)."""
    layers = tuple(l if l.name in names else dataclasses.replace(l, skip=True, block_size=None, n_centroids=None,
                                                                 n_centroids_requested=None, stage=None)
                   for l in plan.layers)
    return Plan(layers, tuple(s for s in plan.stages if set(s) <= set(names)))


def test_plan_follows_execution_order_and_reaches_every_head(tiny):
    cfg, adapter, teacher, plan = tiny
    assert all(l.traced for l in plan.layers)
    names = [l.name for l in plan.layers]
    assert names.index("backbone.body.layer4.0.conv2") < names.index("rpn.head.conv.0.0") \
        < names.index("roi_heads.box_head.fc6") < names.index("roi_heads.mask_predictor.conv5_mask")
    assert plan.layer("roi_heads.mask_predictor.conv5_mask").geometry.kind == "conv_transpose2d"
    assert plan.layer("backbone.body.conv1").skip and plan.layer("rpn.head.cls_logits").skip
    # layers reading the same tensor share a stage (block conv1 + downsample + the FPN lateral)
    stage = plan.layer("backbone.body.layer2.0.conv1").stage
    assert plan.layer("backbone.body.layer2.0.downsample.0").stage == stage
    assert plan.layer("roi_heads.box_predictor.cls_score").stage == plan.layer("roi_heads.box_predictor.bbox_pred").stage
    # frozen BN: affine parameters counted by the paper's accounting, never trained
    bns = [m for m in teacher.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bns and all(isinstance(m.weight, nn.Parameter) and not m.weight.requires_grad for m in bns)
    assert size_report(teacher, plan).ratio > 5


def test_forward_keeps_what_the_loss_needs_and_the_loss_is_zero_on_the_teacher(tiny):
    cfg, adapter, teacher, plan = tiny
    batch = next(adapter.calibration_batches(0, 1, 2, 2, seed=0))
    with torch.no_grad():
        out = adapter.forward(teacher, batch)
    assert list(out.features) == ["0", "1", "2", "3", "pool"]
    assert out.objectness.shape[0] == out.rpn_deltas.shape[0] > 0
    assert all(len(p) <= 16 for p in out.proposals)                          # box_rois
    assert out.class_logits.shape == (sum(len(p) for p in out.proposals), 4)
    assert out.mask_logits.shape == (sum(len(b) for b in out.mask_boxes), 28, 28)
    assert all(len(b) <= 4 for b in out.mask_boxes)                          # mask_rois
    student = copy.deepcopy(teacher)
    loss = adapter.distill_loss(adapter.forward(student, batch), out)           # heads on the teacher's boxes
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    assert set(adapter.last_terms) == {"features", "rpn_objectness", "rpn_boxes", "box_cls", "box_reg", "mask"}


def test_every_part_of_the_network_gets_a_distillation_gradient(tiny):
    cfg, adapter, teacher, plan = tiny
    names = ["backbone.body.layer1.0.conv1", "backbone.fpn.layer_blocks.0.0", "rpn.head.conv.0.0",
             "roi_heads.box_head.fc6", "roi_heads.box_predictor.cls_score", "roi_heads.mask_head.1.0",
             "roi_heads.mask_predictor.conv5_mask"]
    student = quantized_copy(teacher, plan, names, n_centroids=4)
    batch = next(adapter.train_batches(0, 1, 2, seed=0))
    with torch.no_grad():
        target = adapter.forward(teacher, batch)
    out = adapter.forward(student, batch)
    assert out.class_logits is None                                              # deferred to the loss
    loss = adapter.distill_loss(out, target)
    assert float(loss) > 0 and all(v >= -1e-6 for v in adapter.last_terms.values())
    loss.backward()
    for n, layer in pq_layers(student).items():
        assert layer.centroids.grad is not None and layer.centroids.grad.abs().sum() > 0, n


def test_train_mode_keeps_the_detector_in_eval_mode(tiny, data):
    cfg, adapter, teacher, plan = tiny
    adapter.set_train_mode(teacher, True)
    assert not teacher.training and not teacher.roi_heads.training
    bn = build_maskrcnn("maskrcnn_small", norm="bn", **cfg.model.kwargs)
    adapter.set_train_mode(bn, True)
    assert not bn.training and all(m.training for m in bn.modules() if isinstance(m, nn.BatchNorm2d))
    adapter.set_train_mode(bn, False)
    assert not any(m.training for m in bn.modules())


def test_supervised_option_uses_the_standard_losses(data):
    cfg = tiny_config(data, data={"loss": "supervised"})
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model()
    plan = plan_for(cfg, teacher, adapter)
    student = quantized_copy(teacher, plan, ["roi_heads.box_head.fc6", "roi_heads.mask_head.0.0"])
    batch = next(adapter.train_batches(0, 1, 2, seed=0))
    assert set(batch) == {"images", "targets"} and batch["targets"][0]["masks"].dtype == torch.uint8
    with torch.no_grad():
        target = adapter.forward(teacher, batch)
    out = adapter.forward(student, batch)
    assert set(out.supervised) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                                   "loss_mask"}
    loss = adapter.distill_loss(out, target)
    assert set(adapter.last_terms) == {"supervised"} and torch.isfinite(loss)
    loss.backward()
    assert pq_layers(student)["roi_heads.mask_head.0.0"].centroids.grad.abs().sum() > 0
    assert not student.training


def test_flipped_labelled_batches_keep_boxes_on_their_masks(data):
    cfg = tiny_config(data, data={"loss": "both"})
    adapter = make_adapter(cfg.model, cfg.data)
    for batch in [next(adapter.train_batches(0, 1, 6, seed=s)) for s in range(2)]:
        for t in batch["targets"]:
            for box, mask in zip(t["boxes"], t["masks"]):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_calibration_on_photographs_keeps_the_image_sizes(tiny, data):
    cfg, adapter, teacher, plan = tiny
    photos = make_adapter(cfg.model, {**cfg.data, "calibration": "photos"})
    own = [x for b in adapter.calibration_batches(0, 1, 5, 2, seed=7) for x in b]
    cut = [x for b in photos.calibration_batches(0, 1, 5, 2, seed=7) for x in b]
    assert [x.shape for x in cut] == [x.shape for x in own] and all(x.dtype == y.dtype for x, y in zip(cut, own))
    assert all(0 <= float(x.min()) and float(x.max()) <= 1 and not torch.equal(x, y) for x, y in zip(cut, own))
    halves = [x for shard in range(2) for b in photos.calibration_batches(shard, 2, 5, 2, seed=7) for x in b]
    assert sorted(float(x.sum()) for x in halves) == sorted(float(x.sum()) for x in cut)


def test_data_shards_are_disjoint_and_images_only(tiny, data):
    cfg, adapter, teacher, plan = tiny
    seen = []
    for shard in range(3):
        for batch in adapter.calibration_batches(shard, 3, 10, 4, seed=7):
            seen += [float(x.sum()) for x in batch]
    assert len(seen) == len(set(seen)) == 10
    ids = [i for shard in range(2) for b in adapter.eval_batches(shard, 2, 5) for i in b["image_ids"]]
    # the engine's evaluation rule (bgd_dist.sharding.eval_items): a fixed seeded subset, in id order
    val = adapter._split("val")
    assert sorted(ids) == [val.image_id(i) for i in eval_items(len(val), 0, 1, 5).tolist()]
    assert len(set(ids)) == 5
    # calibration needs images only: no annotation file
    bare = make_adapter(cfg.model, {**cfg.data, "train_annotations": None})
    assert len(next(bare.calibration_batches(0, 1, 3, 3, seed=0))) == 3
    a, b = (next(adapter.train_batches(s, 2, 2, seed=3)) for s in (0, 1))
    whole = next(adapter.train_batches(0, 1, 4, seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a + b, whole))            # shards of one global batch


def test_required_data_keys_are_named(tiny):
    cfg = load_pipeline("pipelines/maskrcnn_r50_fpn.yaml")
    adapter = make_adapter(cfg.model, cfg.data)
    with pytest.raises(ValueError, match="data.train_images is required"):
        next(adapter.calibration_batches(0, 1, 1, 1, 0))
    with pytest.raises(ValueError, match="data.val_annotations is required"):
        adapter.evaluator()
    # the paper's model from trained weights: frozen BN with eps 0 is part of the architecture
    assert adapter.arch()["kwargs"] == {"arch": "maskrcnn_resnet50_fpn", "norm": "frozen_bn", "bn_eps": 0.0}


def test_export_and_reload_gives_the_same_detections(tiny, tmp_path):
    cfg, adapter, teacher, plan = tiny
    student = round_centroids_to_fp16(quantized_copy(teacher, plan, [l.name for l in plan.quantized]))
    save_compressed(tmp_path / "tiny.bgd", student, plan, adapter.arch())
    loaded = load_compressed(tmp_path / "tiny.bgd")
    batch = next(adapter.eval_batches(0, 1, 3))
    with torch.no_grad():
        roi = [m.roi_heads for m in (student, loaded)]
        for r in roi:
            r.score_thresh = 0.0
        a, b = adapter.predict(student, batch), adapter.predict(loaded, batch)
    assert sum(len(o["boxes"]) for o in a) > 0
    for x, y in zip(a, b):
        for k in ("boxes", "labels", "scores", "masks"):
            torch.testing.assert_close(x[k], y[k])


def test_real_maskrcnn_r50_fpn_plan_stats_quantize_export(tmp_path, data):
    """The paper's architecture (random weights) on one small image: plan, statistics of a few
    stages, quantize a stage, export, reload, same outputs."""
    assert torchvision.models.detection.maskrcnn_resnet50_fpn  # the real model
    small = {"min_size": 64, "max_size": 64, "box_score_thresh": 0.0, "box_detections_per_img": 5,
             "rpn_post_nms_top_n_test": 50, "rpn_pre_nms_top_n_test": 100}
    overrides = ["model.weights=null", f"model.kwargs={small}", "data.example_size=64",
                 "data.distill={box_rois: 20, mask_rois: 2}"] + [f"data.{k}={v}" for k, v in data.items()]
    cfg = load_pipeline("pipelines/maskrcnn_r50_fpn.yaml", overrides)
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model()
    plan = plan_for(cfg, teacher, adapter)
    assert all(l.traced for l in plan.layers) and len(plan.stages) > 50
    assert size_report(build_architecture(adapter.arch()), plan).uncompressed_mb == pytest.approx(169.58, abs=0.01)
    ex = SerialExecutor(num_shards=1)
    ex.start(cfg.model, cfg.data)
    ex.load_student(student_state(teacher))
    stats = {}
    for s in (0, 1, len(plan.stages) - 1):   # first stages and conv5_mask
        layers = [LayerRequest(n, plan.layer(n).geometry, plan.layer(n).block_size, "gram") for n in plan.stages[s]]
        stats.update(ex.collect(CollectRequest(layers, n_images=1, batch_size=1, seed=0)).stats)
    assert stats["roi_heads.mask_predictor.conv5_mask"].n_rows > 0
    names = list(plan.stages[0])
    codebooks = {n: fit_codebook(get_submodule(teacher, n).weight.detach(), plan.layer(n).geometry,
                                 stats[n].metric(), plan.layer(n).n_centroids, plan.layer(n).block_size, 3)
                 for n in names}
    student = round_centroids_to_fp16(quantize_(copy.deepcopy(teacher), plan, codebooks))
    part = sub_plan(plan, names)
    save_compressed(tmp_path / "r50.bgd", student, part, adapter.arch())
    loaded = load_compressed(tmp_path / "r50.bgd")
    assert set(pq_layers(loaded)) == set(names)
    batch = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))]   # any aspect ratio
    a, b = adapter.predict(student, batch), adapter.predict(loaded, batch)
    assert len(a[0]["boxes"]) > 0
    for k in ("boxes", "labels", "scores", "masks"):
        torch.testing.assert_close(a[0][k], b[0][k])


def test_teacher_forcing_pairs_the_region_heads_rows_with_the_teachers(tiny):
    """With a student whose RPN head and box head differ from the teacher's, the region heads work on
    other proposals and detections: their rows do not correspond to the teacher's. Forcing the RPN
    head's and the box predictor's outputs to the teacher's gives them the teacher's proposals and
    detections: the box head's first layer and the mask head then see exactly the teacher's inputs
    (same backbone), and the box predictor, behind the changed layer, only that layer's difference."""
    cfg, adapter, teacher, plan = tiny
    student = copy.deepcopy(teacher)
    changed = [l.name for l in plan.quantized if l.name.startswith("rpn.head.conv")] + ["roi_heads.box_head.fc7"]
    with torch.no_grad():
        for n in changed:
            w = get_submodule(student, n).weight
            w.add_(0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    names = ["roi_heads.box_head.fc6", "roi_heads.box_predictor.cls_score", "roi_heads.mask_head.0.0"]
    layers = [LayerRequest(n, plan.layer(n).geometry, plan.layer(n).block_size, "hessian_teacher") for n in names]
    ex = SerialExecutor(num_shards=1)
    ex.start(cfg.model, cfg.data)
    try:
        ex.load_student(student_state(student))
        errors = {}
        for force in ("", r"rpn\.head|roi_heads\.box_predictor"):
            stats = ex.collect(CollectRequest(layers, n_images=4, batch_size=2, seed=0, force=force)).stats
            assert all(s.aligned and s.n_inputs > 0 for s in stats.values())
            errors[force] = {n: s.input_error for n, s in stats.items()}
    finally:
        ex.close()
    free, forced = errors[""], errors[r"rpn\.head|roi_heads\.box_predictor"]
    assert free["roi_heads.box_head.fc6"] > 0.01 and free["roi_heads.mask_head.0.0"] > 0.01
    assert forced["roi_heads.box_head.fc6"] == 0.0 and forced["roi_heads.mask_head.0.0"] == 0.0
    assert 0 < forced["roi_heads.box_predictor.cls_score"] < free["roi_heads.box_predictor.cls_score"]


def test_teacher_forcing_must_name_modules_of_the_model(tiny, tmp_path):
    from bgd_dist.config import ConfigError
    from bgd_dist.runner import run

    with pytest.raises(ConfigError, match=r"teacher_forcing: 'rpn\(' is not a valid regular expression"):
        load_pipeline("pipelines/digits.yaml", ["quantize.teacher_forcing=rpn("])
    cfg, *_ = tiny
    cfg = dataclasses.replace(cfg, quantize=dataclasses.replace(cfg.quantize, teacher_forcing=r"rpn\.heads"))
    with pytest.raises(ValueError, match=r"teacher_forcing: 'rpn\\\\.heads' fully matches no module of MaskRCNN"):
        run(cfg, tmp_path, do_eval=False, progress=False)
