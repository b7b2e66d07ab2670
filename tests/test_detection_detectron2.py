"""The detectron2 adapter: detectron2's own R50-FPN Mask R-CNN (model-zoo ``mask_rcnn_R_50_FPN_3x``,
random weights, 64-pixel inputs, few RoIs). Skipped, with the reason, without detectron2."""

import copy
import json
import math

import pytest
import torch

from bgd_dist.config import ModelConfig, pipeline_from_dict
from detection.detectron2_adapter import INSTALL_HINT, PAPER_RULES, detectron2_available

needs_detectron2 = pytest.mark.skipif(not detectron2_available(),
                                      reason="detectron2 is not installed (not on PyPI; `make detectron2` builds it)")

# small test-time work: few proposals and detections; score threshold 0 so random weights detect
SMALL = ["MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
         "TEST.DETECTIONS_PER_IMAGE", "8", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
# one layer of each part: backbone (an unfused conv), FPN (held in a plain list by detectron2), RPN,
# box head, box predictor, mask head conv and deconv
PARTS = ["backbone.bottom_up.res2.0.conv1.conv", "backbone.fpn_lateral2", "backbone.fpn_output3",
         "proposal_generator.rpn_head.conv.conv", "roi_heads.box_head.fc2", "roi_heads.box_predictor.cls_score",
         "roi_heads.mask_head.mask_fcn1.conv", "roi_heads.mask_head.deconv"]


@pytest.mark.skipif(detectron2_available(), reason="detectron2 is installed")
def test_without_detectron2_the_adapter_says_how_to_install_it():
    from bgd_dist.adapters import adapter_class

    cls = adapter_class("detectron2")        # importing the module never needs detectron2
    with pytest.raises(ImportError, match="not on PyPI"):
        cls(ModelConfig("detectron2", "mask_rcnn_R_50_FPN_3x"), {})
    assert "install" in INSTALL_HINT


def test_child_lists_follow_swapped_children():
    """detectron2's FPN runs layers it keeps in a plain list: after children_by_name, swapping the
    registered child (quantization, loading a file) swaps what the forward runs."""
    from torch import nn

    from detection.detectron2_adapter import children_by_name

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
            self.layers = [self.b, self.a]          # not registered, order differs from registration

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    toy = children_by_name(Toy())
    assert list(toy.layers) == [toy.b, toy.a] and len(toy.layers) == 2
    toy.a = nn.Identity()
    assert toy.layers[1] is toy.a and toy.layers[-1:] == [toy.a]
    x = torch.randn(3, 2)
    torch.testing.assert_close(toy(x), toy.b(x))
    twin = copy.deepcopy(toy)
    assert twin.layers[0] is twin.b and twin.layers[0] is not toy.b
    assert set(twin.state_dict()) == {"b.weight", "b.bias"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from detection.shapes import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes"), n_train=6, n_val=3, size=64, seed=0)


@pytest.fixture(scope="module")
def d2(shapes):
    from bgd_dist.adapters import make_adapter, plan_for

    cfg = pipeline_from_dict({
        "name": "d2", "model": {"adapter": "detectron2", "arch": "mask_rcnn_R_50_FPN_3x",
                                "kwargs": {"num_classes": 3, "min_size_test": 64, "max_size_test": 64,
                                           "opts": SMALL}},
        "data": {**shapes, "example_size": 64, "distill": {"box_rois": 16, "mask_rois": 2}},
        "quantize": {"rules": PAPER_RULES}})
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model()
    return cfg, adapter, teacher, plan_for(cfg, teacher, adapter)


@pytest.fixture(scope="module")
def student(d2):
    """``PARTS`` quantized (K = 8, one weights-only k-means step), centroids rounded to fp16 as the file
    stores them."""
    from bgd_dist.core.kmeans import fit_codebook
    from bgd_dist.nn.modules import get_submodule, pq_layers, quantize_

    cfg, adapter, teacher, plan = d2
    codebooks = {n: fit_codebook(get_submodule(teacher, n).weight.detach(), plan.layer(n).geometry, None, 8,
                                 plan.layer(n).block_size, 1) for n in PARTS}
    model = quantize_(copy.deepcopy(teacher), plan, codebooks)
    with torch.no_grad():
        for layer in pq_layers(model).values():
            layer.centroids.copy_(layer.centroids.half().float())
    return model


@needs_detectron2
def test_detectron2_plan_reaches_every_head(d2):
    cfg, adapter, teacher, plan = d2
    assert all(l.traced for l in plan.layers)
    names = [l.name for l in plan.layers]
    assert names.index("backbone.bottom_up.res5.2.conv3.conv") < names.index("proposal_generator.rpn_head.conv.conv") \
        < names.index("roi_heads.box_head.fc1") < names.index("roi_heads.mask_head.deconv")
    assert "backbone.bottom_up.res2.0.conv1.conv" in names           # unfused conv + norm
    for skipped in ("backbone.bottom_up.stem.conv1.conv", "proposal_generator.rpn_head.objectness_logits",
                    "proposal_generator.rpn_head.anchor_deltas", "roi_heads.mask_head.predictor"):
        assert plan.layer(skipped).skip
    assert plan.layer("roi_heads.box_head.fc1").block_size == 16
    assert plan.layer("roi_heads.box_head.fc2").block_size == 4
    assert plan.layer("roi_heads.mask_head.deconv").geometry.kind == "conv_transpose2d"
    assert plan.layer("roi_heads.mask_head.deconv").block_size == 4
    assert plan.layer("backbone.bottom_up.res2.0.conv2.conv").block_size == 9
    # layers reading the same tensor share a stage (block conv1 + shortcut)
    assert plan.layer("backbone.bottom_up.res3.0.conv1.conv").stage == plan.layer("backbone.bottom_up.res3.0.shortcut.conv").stage


@needs_detectron2
def test_paper_allocation_on_detectron2_matches_bgd_size():
    """pipelines/maskrcnn_r50_fpn_detectron2.yaml: the figures the README puts next to torchvision's."""
    from bgd_dist.adapters import build_architecture, make_adapter, plan_for
    from bgd_dist.config import load_pipeline
    from bgd_dist.core.sizing import size_report

    small = "model.kwargs={min_size_test: 64, max_size_test: 64}"     # the trace only; sizes do not depend on it
    cfg = load_pipeline("pipelines/maskrcnn_r50_fpn_detectron2.yaml", [small, "data.example_size=64"])
    adapter = make_adapter(cfg.model, cfg.data)
    model = build_architecture(adapter.arch())
    plan = plan_for(cfg, model, adapter)
    assert all(l.traced for l in plan.layers)
    report = size_report(model, plan)
    assert report.uncompressed_mb == pytest.approx(169.16, abs=0.005)
    assert report.compressed_mb == pytest.approx(6.42, abs=0.005)
    assert plan.layer("roi_heads.box_predictor.cls_score").geometry.weight_shape == (81, 1024)


@needs_detectron2
def test_detectron2_forward_keeps_what_the_loss_needs_and_the_loss_is_zero_on_the_teacher(d2):
    cfg, adapter, teacher, plan = d2
    batch = next(adapter.calibration_batches(0, 1, 2, 2, seed=0))
    with torch.no_grad():
        out = adapter.forward(teacher, batch)
    assert list(out.features) == ["p2", "p3", "p4", "p5", "p6"]
    assert out.objectness.shape[0] == out.rpn_deltas.shape[0] > 0
    assert all(len(p) <= 16 for p in out.proposals)                          # box_rois
    assert out.class_logits.shape == (sum(len(p) for p in out.proposals), 4)  # 3 classes + background (last)
    assert out.box_deltas.shape == (len(out.class_logits), 3, 4)
    assert out.mask_logits.shape == (sum(len(b) for b in out.mask_boxes), 28, 28)
    assert all(len(b) <= 2 for b in out.mask_boxes)                          # mask_rois
    loss = adapter.distill_loss(adapter.forward(copy.deepcopy(teacher), batch), out)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-5)
    assert set(adapter.last_terms) == {"features", "rpn_objectness", "rpn_boxes", "box_cls", "box_reg", "mask"}


@needs_detectron2
def test_detectron2_every_part_of_the_network_gets_a_distillation_gradient(d2, student):
    from bgd_dist.nn.modules import pq_layers

    cfg, adapter, teacher, plan = d2
    batch = next(adapter.train_batches(0, 1, 2, seed=0))
    with torch.no_grad():
        target = adapter.forward(teacher, batch)
    model = copy.deepcopy(student)
    out = adapter.forward(model, batch)
    assert out.class_logits is None                                          # deferred to the loss
    loss = adapter.distill_loss(out, target)
    assert float(loss.detach()) > 0 and all(v >= -1e-6 for v in adapter.last_terms.values())
    loss.backward()
    layers = pq_layers(model)
    assert set(layers) == set(PARTS)
    for n, layer in layers.items():   # the FPN layers too: the forward runs the quantized module
        assert layer.centroids.grad is not None and layer.centroids.grad.abs().sum() > 0, n


@needs_detectron2
def test_detectron2_compressed_file_gives_the_same_predictions(d2, student, tmp_path):
    from bgd_dist import load_compressed
    from bgd_dist.fileformat import read_header, save_compressed
    import dataclasses

    from bgd_dist.plan import Plan

    cfg, adapter, teacher, plan = d2
    part = Plan(tuple(l if l.name in PARTS else dataclasses.replace(l, skip=True, block_size=None, n_centroids=None,
                                                                    n_centroids_requested=None, stage=None)
                      for l in plan.layers), ())
    part = Plan(tuple(dataclasses.replace(l, n_centroids=8) if l.name in PARTS else l for l in part.layers), ())
    save_compressed(tmp_path / "d2.bgd", student, part, adapter.arch())
    kwargs = read_header(tmp_path / "d2.bgd")["arch"]["kwargs"]     # plain JSON, no pickled config
    assert kwargs == {"config": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", "opts": SMALL,
                      "num_classes": 3, "input_format": "BGR", "pixel_mean": [103.53, 116.28, 123.675],
                      "pixel_std": [1.0, 1.0, 1.0], "min_size_test": 64, "max_size_test": 64}
    loaded = load_compressed(tmp_path / "d2.bgd")
    batch = next(adapter.eval_batches(0, 1, 2))
    a, b, t = adapter.predict(student, batch), adapter.predict(loaded, batch), adapter.predict(teacher, batch)
    assert sum(len(o["boxes"]) for o in a) > 0
    assert any(x["scores"].shape != y["scores"].shape or not torch.equal(x["scores"], y["scores"])
               for x, y in zip(a, t))                               # the quantized layers act
    for x, y in zip(a, b):
        for k in ("boxes", "labels", "scores", "masks"):
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


# -- COCO evaluation: ours against detectron2's COCOEvaluator ----------------------------------------

def _detectron2_coco_metrics(name: str, annotations: str, image_root: str, image_ids, outputs) -> dict:
    """detectron2's COCOEvaluator (pycocotools' COCOeval) on torchvision-style outputs."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, annotations, image_root)
    DatasetCatalog.get(name)                      # sets the category id mapping in the metadata
    assert MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, output_dir=None, use_fast_impl=False)
    evaluator.reset()
    for image_id, o in zip(image_ids, outputs):
        h, w = o["masks"].shape[-2:]
        inst = Instances((h, w), pred_boxes=Boxes(o["boxes"]), scores=o["scores"], pred_classes=o["labels"],
                         pred_masks=o["masks"][:, 0] > 0.5)
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    return evaluator.evaluate()


def _assert_same_metrics(ours: dict, theirs: dict) -> None:
    """detectron2 reports the six AP numbers in percent, NaN where COCOeval says -1."""
    for prefix, task in (("box", "bbox"), ("mask", "segm")):
        for stat in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            mine, other = ours[f"{prefix}_{stat}"], theirs[task][stat]
            if mine < 0:
                assert math.isnan(other), (task, stat)
            else:
                assert mine * 100 == pytest.approx(other, rel=0, abs=1e-9), (task, stat, mine, other)


@needs_detectron2
def test_our_coco_numbers_equal_detectron2s_on_the_same_predictions(shapes):
    """Ground-truth boxes and masks, jittered, dropped and mislabelled by a seeded rule, with
    scores: non-trivial AP values that both evaluators must agree on."""
    from pycocotools.coco import COCO

    from detection.evaluation import COCOEvaluator

    gt = COCO(shapes["val_annotations"])
    cats = sorted(gt.getCatIds())
    label_to_category = dict(enumerate(cats))
    g = torch.Generator().manual_seed(0)
    image_ids, outputs = [], []
    for image_id in sorted(gt.getImgIds()):
        info = gt.loadImgs(image_id)[0]
        h, w = info["height"], info["width"]
        anns = gt.loadAnns(gt.getAnnIds(imgIds=image_id))
        boxes, labels, masks = [], [], []
        for a in anns:
            x, y, bw, bh = a["bbox"]
            boxes.append([x, y, x + bw, y + bh])
            labels.append(cats.index(a["category_id"]))
            masks.append(torch.from_numpy(gt.annToMask(a)).float())
        n = len(boxes)
        boxes = torch.tensor(boxes) + torch.randn(n, 4, generator=g) * 3
        labels = torch.tensor(labels)
        wrong = torch.rand(n, generator=g) < 0.3
        labels[wrong] = (labels[wrong] + 1) % len(cats)
        masks = torch.stack(masks)[:, None].roll(1, -1)
        outputs.append({"boxes": boxes, "labels": labels, "scores": torch.rand(n, generator=g), "masks": masks})
        image_ids.append(image_id)
    ours = COCOEvaluator(shapes["val_annotations"], label_to_category)
    ours.process({"image_ids": image_ids}, outputs)
    mine = ours.result()
    assert 0 < mine["box_AP"] < 1 and 0 < mine["mask_AP"] < 1
    theirs = _detectron2_coco_metrics("bgd_shapes_val_gt", shapes["val_annotations"], shapes["val_images"],
                                      image_ids, outputs)
    _assert_same_metrics(mine, theirs)


# -- end to end ----------------------------------------------------------------------------------------

# detectron2's R50-FPN (the zoo config, all 50 layers and every head) narrowed by config overrides so a
# full run fits a test; one layer of each part is quantized, the rest left as they are
NARROW = ["MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
          "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
          "MODEL.ROI_MASK_HEAD.CONV_DIM", "32"] + SMALL
E2E_LAYERS = (r"backbone\.bottom_up\.res5\.2\.conv2\.conv|backbone\.fpn_output2|proposal_generator\.rpn_head\.conv\.conv|"
              r"roi_heads\.box_predictor\.cls_score|roi_heads\.mask_head\.mask_fcn4\.conv|roi_heads\.mask_head\.deconv")
E2E_RULES = [{"match": r"roi_heads\.box_head\.fc1", "block_size": 16},
             {"match": E2E_LAYERS, "kind": "linear", "block_size": 4},
             {"match": E2E_LAYERS, "kind": "conv_transpose2d", "block_size": 4},
             {"match": E2E_LAYERS, "kernel": [3, 3], "block_size": 9},
             {"match": ".*", "skip": True}]


@needs_detectron2
def test_detectron2_end_to_end_on_ray(shapes, ray_cluster, tmp_path):
    """plan, statistics on Ray (2 workers), fit, layer-wise and global distillation, export, COCO
    evaluation; the file reloads to the same detections and our COCO numbers are detectron2's."""
    from bgd_dist import load_compressed
    from bgd_dist.adapters import make_adapter
    from bgd_dist.runner import run

    cfg = pipeline_from_dict({
        "name": "d2_e2e",
        "model": {"adapter": "detectron2", "arch": "mask_rcnn_R_50_FPN_3x",
                  "kwargs": {"num_classes": 3, "min_size_test": 64, "max_size_test": 64, "opts": NARROW}},
        "data": {**shapes, "example_size": 64, "eval_batch_size": 3, "distill": {"box_rois": 16, "mask_rois": 2}},
        "quantize": {"n_iter": 2, "n_calibration": 2, "batch_size": 2, "seed": 0, "n_centroids": 16, "rules": E2E_RULES},
        "finetune": {"layerwise": {"iterations": 1, "batch_size": 2, "lr": 0.01},
                     "global": {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "lr": 0.001}},
        "executor": {"kind": "ray", "num_workers": 2},
        "eval": {"max_images": 3}})
    report = run(cfg, tmp_path, progress=False)
    after = report["metrics_after"]
    assert after["n_images"] == 3 and after["n_detections"] > 0
    assert len(report["stages"]) >= 5 and all(s["loss_start"] is not None for s in report["stages"])  # layer-wise
    events = {e["event"]: e for e in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())}
    assert events["global"]["iterations"] == 1                                                   # global
    loaded = load_compressed(tmp_path / "model.bgd")
    assert "backbone.fpn_output2" in {n for n, m in loaded.named_modules() if hasattr(m, "centroids")}
    adapter = make_adapter(cfg.model, cfg.data)
    image_ids, outputs = [], []
    for batch in adapter.eval_batches(0, 1, 3):
        image_ids += batch["image_ids"]
        outputs += adapter.predict(loaded, batch)
    ours = adapter.evaluator()
    ours.process({"image_ids": image_ids}, outputs)
    mine = ours.result()
    for k in ("box_AP", "mask_AP", "n_detections"):   # the file's model is the one the run evaluated
        assert mine[k] == pytest.approx(after[k], abs=1e-12), k
    theirs = _detectron2_coco_metrics("bgd_shapes_val_e2e", shapes["val_annotations"], shapes["val_images"],
                                      image_ids, outputs)
    _assert_same_metrics(mine, theirs)
    assert json.loads((tmp_path / "report.json").read_text())["metrics_after"] == after
