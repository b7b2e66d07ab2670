"""The Mask R-CNN adapter (torchvision): COCO images, detection distillation, COCO evaluation.

Batches are lists of image tensors (3, H, W) in [0, 1], any sizes (calibration
and distillation); evaluation batches and labelled batches are dicts
``{"images": [...], "image_ids": [...]}`` / ``{"images": [...], "targets": [...]}``.

Distillation without labels (the default, ``data.loss: distill``)
------------------------------------------------------------------
The method needs only unlabelled images, so the student learns to reproduce
what the teacher computes at every place detection depends on, on the same
inputs. :meth:`MaskRCNNAdapter.forward` runs the network step by step
(transform, backbone+FPN, RPN head, then the RoI heads) and keeps the
intermediate results; :meth:`MaskRCNNAdapter.distill_loss` compares them:

- ``features``: the FPN levels, MSE per level normalised by the teacher's mean
  square of that level, averaged over levels (levels of different scales count
  equally);
- ``rpn_objectness``: per anchor, the binary KL divergence between the
  teacher's and the student's objectness probabilities;
- ``rpn_boxes``: per anchor, the smooth-L1 distance (beta 1/9, as the RPN
  loss) between box deltas, weighted by the teacher's objectness probability
  (the deltas of background anchors mean nothing);
- ``box_cls``: the box head's class logits on the *teacher's* proposals,
  KL(teacher softmax || student log-softmax) (the paper's classification
  loss, temperature ``T``, scaled by T²);
- ``box_reg``: the class-specific box deltas on the same proposals, smooth-L1
  weighted by the teacher's probability of each class;
- ``mask``: the mask logits on the teacher's top ``mask_rois`` detections per
  image (its proposals refined by its own box deltas, its predicted class),
  per-pixel binary KL, weighted by the teacher's score.

The RoI heads of teacher and student see the same boxes, so their outputs are
comparable element by element (the student's own proposals would differ
from the teacher's as soon as one layer is quantized). The total is
``sum(weight[k] * term[k])`` with the weights of ``data.distill``. The heads
run on the top ``box_rois`` proposals and ``mask_rois`` detections per image
(statistics are collected on the same RoIs).
``data.loss: supervised`` instead uses the standard Mask R-CNN losses (RPN,
box, mask) on labelled training images, as later work did; ``both`` adds them
(weight ``distill.supervised``) to the distillation terms.

Mode: torchvision switches Mask R-CNN to its loss code path in train mode, so
:meth:`set_train_mode` keeps the detector in eval mode and only puts BatchNorm
layers (if any; trained detectors use frozen BN) in train mode.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from bgd_dist.adapters import AdapterBase, DataError
from bgd_dist.config import MISSING, from_mapping, require
from bgd_dist.photos import CALIBRATION_SOURCES, photo_crop
from bgd_dist.sharding import calibration_items, chunks, eval_items, train_items

from .coco import CocoImages, category_mapping
from .models import build_maskrcnn

log = logging.getLogger(__name__)

LOSSES = ("distill", "supervised", "both")


@dataclass(frozen=True)
class DistillSettings:
    """``data.distill``: the weights of the loss terms and the RoIs they are computed on."""

    features: float = 1.0
    rpn_objectness: float = 1.0
    rpn_boxes: float = 1.0
    box_cls: float = 1.0
    box_reg: float = 1.0
    mask: float = 1.0
    supervised: float = 1.0     # the standard Mask R-CNN losses (loss: supervised or both)
    temperature: float = 1.0    # of the box classification KL
    box_rois: int = 64          # proposals per image the box head runs on (the top ones by objectness)
    mask_rois: int = 8          # detections per image the mask head runs on (the top ones by score)

    def __post_init__(self):
        for k in ("features", "rpn_objectness", "rpn_boxes", "box_cls", "box_reg", "mask", "supervised"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k}: weights must be >= 0, got {getattr(self, k)}")
        if self.temperature <= 0 or self.mask_rois < 1 or self.box_rois < 1:
            raise ValueError("temperature must be > 0, box_rois and mask_rois >= 1")


@dataclass(frozen=True)
class DetectionData:
    train_images: str | None = None
    train_annotations: str | None = None   # optional for quantization (images only are used)
    val_images: str | None = None
    val_annotations: str | None = None
    num_workers: int = 0                   # reserved (images are read in the worker process)
    example_size: int = 128                # side of the tracing example
    eval_batch_size: int = 4
    hflip: bool = True                     # flip augmentation of the distillation batches
    category_ids: str = "auto"             # label <-> category id: auto | contiguous | identity
    loss: str = "distill"                  # distill | supervised | both
    distill: DistillSettings = field(default_factory=DistillSettings)
    on_bad_image: str = "fail"             # an unreadable image: fail (naming it) | skip (log it, count it in the report)
    calibration: str = "task"              # task (train images) | photos (crops of natural photographs, same sizes)

    def __post_init__(self):
        if self.calibration not in CALIBRATION_SOURCES:
            raise ValueError(f"calibration: expected one of {CALIBRATION_SOURCES}, got {self.calibration!r}")
        if self.on_bad_image not in ("fail", "skip"):
            raise ValueError(f"on_bad_image: expected fail or skip, got {self.on_bad_image!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        if self.category_ids not in ("auto", "contiguous", "identity"):
            raise ValueError(f"category_ids: expected auto, contiguous or identity, got {self.category_ids!r}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: must be >= 1, got {self.eval_batch_size}")


@dataclass
class MaskRCNNOutputs:
    """What :meth:`MaskRCNNAdapter.forward` keeps of one pass (never crosses a process).

    Shapes for a batch of n images, A anchors in all, P_i proposals and M_i mask
    boxes of image i, C classes (background included):
    features: FPN levels ``{name: (n, c, h, w)}``; objectness (A, 1); rpn_deltas (A, 4);
    proposals: list of (P_i, 4); class_logits (ΣP_i, C); box_deltas (ΣP_i, C - 1, 4) for the
    foreground classes, which are ``class_logits[:, foreground]``; mask_boxes: list of (M_i, 4);
    mask_labels (the model's class index), mask_scores (ΣM_i,); mask_logits (ΣM_i, 28, 28).
    The RoI-head fields are None when the heads were deferred (gradient enabled:
    :meth:`MaskRCNNAdapter.distill_loss` runs them on the teacher's boxes).
    """

    model: nn.Module
    features: "OrderedDict[str, Tensor]"
    image_sizes: list
    objectness: Tensor
    rpn_deltas: Tensor
    proposals: list | None = None
    class_logits: Tensor | None = None
    box_deltas: Tensor | None = None
    mask_boxes: list | None = None
    mask_labels: Tensor | None = None
    mask_scores: Tensor | None = None
    mask_logits: Tensor | None = None
    supervised: dict | None = None
    foreground: slice = field(default_factory=lambda: slice(1, None))  # torchvision: background is class 0


@contextlib.contextmanager
def _training_flag(*modules: nn.Module):
    """Set ``.training`` on these modules only (not their children), restore afterwards."""
    saved = [m.training for m in modules]
    try:
        for m in modules:
            m.training = True
        yield
    finally:
        for m, t in zip(modules, saved):
            m.training = t


def _images(batch) -> list[Tensor]:
    return batch["images"] if isinstance(batch, dict) else list(batch)


def _binary_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Elementwise KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s))) >= 0."""
    p = torch.sigmoid(teacher_logits)
    return F.binary_cross_entropy_with_logits(student_logits, p, reduction="none") \
        - F.binary_cross_entropy_with_logits(teacher_logits, p, reduction="none")


BN_EPS_REQUIRED = ("model.kwargs.bn_eps: required with model.checkpoint for maskrcnn_resnet50_fpn (the frozen BN "
                   "eps is not recorded in a state dict): 0.0 for torchvision's COCO_V1 weights (Detectron-trained), "
                   "1e-5 for a detector trained with torch's BatchNorm")


class MaskRCNNAdapter(AdapterBase):
    """Adapter protocol (see :mod:`bgd_dist.adapters`) for torchvision Mask R-CNN models."""

    def __init__(self, model_config, data_config: dict | None = None):
        self.model_config = model_config
        self.data = from_mapping(DetectionData, data_config or {}, "data")
        self._splits: dict[str, CocoImages] = {}
        self.last_terms: dict[str, float] = {}
        self._skipped: set[str] = set()

    # -- models ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        m = self.model_config
        if m.checkpoint == MISSING:
            require(None, "model.checkpoint")
        return build_maskrcnn(m.arch, m.weights, m.checkpoint, **self._norm_kwargs(), **m.kwargs)

    def _norm_kwargs(self) -> dict:
        """Trained R50-FPN weights use frozen BN: the architecture must say so, and with which eps,
        so that a compressed file rebuilds the same network without the weights. torchvision's
        COCO weights (Detectron-trained) use eps 0; a local checkpoint's eps is not knowable from
        its state dict, so it must be given (``model.kwargs.bn_eps``)."""
        m = self.model_config
        if m.arch == "maskrcnn_resnet50_fpn" and (m.weights or m.checkpoint) and "norm" not in m.kwargs:
            if "bn_eps" in m.kwargs:
                return {"norm": "frozen_bn"}
            if m.checkpoint and not m.weights:
                raise ValueError(BN_EPS_REQUIRED)
            return {"norm": "frozen_bn", "bn_eps": 0.0}
        return {}

    def arch(self) -> dict:
        kwargs = {**self._norm_kwargs(), **self.model_config.kwargs}
        return {"factory": "detection.models:build_maskrcnn", "kwargs": {"arch": self.model_config.arch, **kwargs}}

    @property
    def num_classes(self) -> int:
        kw = self.model_config.kwargs
        return int(kw.get("num_classes", 91 if self.model_config.arch == "maskrcnn_resnet50_fpn" else 4))

    def example_batch(self) -> list[Tensor]:
        s = self.data.example_size
        return [torch.rand(3, s, s, generator=torch.Generator().manual_seed(0))]

    def trace(self, model: nn.Module):
        """One forward in eval mode that reaches every head: the score threshold is
        lowered for the trace so the mask branch runs even on a random model."""
        model.eval()
        device = next(model.parameters()).device
        roi = model.roi_heads
        saved = roi.score_thresh, roi.detections_per_img
        roi.score_thresh, roi.detections_per_img = -1.0, 8
        try:
            return model([x.to(device) for x in self.example_batch()])
        finally:
            roi.score_thresh, roi.detections_per_img = saved

    def set_train_mode(self, model: nn.Module, train: bool) -> None:
        """Eval mode always (torchvision's train mode means supervised losses); BatchNorm layers
        follow ``train`` so their running statistics update in the global phase."""
        model.eval()
        if train:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()

    def preprocessing(self) -> dict:
        """Images go to the model as they are (a list of RGB (3, H, W) tensors in [0, 1], any size):
        the model resizes and normalises them itself, as recorded here."""
        from bgd_dist.fileformat import build_arch

        transform = build_arch(self.arch(), device="meta").transform
        return {"image": "RGB, values in [0, 1], any size; a list of (3, H, W) tensors",
                "min_size": list(transform.min_size), "max_size": transform.max_size,
                "mean": list(transform.image_mean), "std": list(transform.image_std),
                "applied_by_the_model": True}

    def class_names(self) -> list[str] | None:
        """Per model label (label 0 is the background): the categories of ``data.val_annotations``
        when it is there, else the torchvision weights' categories."""
        from pathlib import Path

        annotations = self.data.val_annotations
        if isinstance(annotations, str) and Path(annotations).is_file():
            from .coco import load_coco

            coco = load_coco(annotations)
            cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
            names = ["__background__"] + ["N/A"] * (self.num_classes - 1)
            for label, cat in self.label_to_category().items():
                names[label] = cats[cat]
            return names
        m = self.model_config
        if m.weights and not m.checkpoint:
            import torchvision

            names = torchvision.models.get_model_weights(m.arch)[m.weights].meta.get("categories")
            if names and len(names) == self.num_classes:
                return list(names)
        return None

    # -- data -----------------------------------------------------------------------------------
    def data_paths(self) -> dict[str, str]:
        """The folders and files this adapter reads (each node checks them before it starts)."""
        d = self.data
        paths = {"data.train_images": d.train_images, "data.train_annotations": d.train_annotations,
                 "data.val_images": d.val_images, "data.val_annotations": d.val_annotations,
                 "model.checkpoint": self.model_config.checkpoint}
        return {k: v for k, v in paths.items() if v and v != MISSING}

    def _split(self, split: str) -> CocoImages:
        if split not in self._splits:
            images = require(getattr(self.data, f"{split}_images"), f"data.{split}_images")
            annotations = getattr(self.data, f"{split}_annotations")
            if annotations == MISSING:
                annotations = None if split == "train" else require(None, f"data.{split}_annotations")
            self._splits[split] = CocoImages(images, annotations)
        return self._splits[split]

    def label_to_category(self) -> dict[int, int]:
        annotations = require(self.data.val_annotations, "data.val_annotations")
        return category_mapping(annotations, self.num_classes, self.data.category_ids)

    def _load(self, split: CocoImages, index: int) -> Tensor | None:
        """Image ``index`` of ``split``; an unreadable file is a DataError naming it, or with
        ``data.on_bad_image: skip`` None (logged once, listed by :meth:`skipped_items`)."""
        try:
            return split.load(index)
        except OSError as e:
            if self.data.on_bad_image != "skip":
                raise DataError(f"{e}; fix or remove the file, or set data.on_bad_image: skip") from None
            path = str(split.entries[index][1])
            if path not in self._skipped:
                log.warning("%s: unreadable image skipped (data.on_bad_image: skip)", path)
                self._skipped.add(path)
            return None

    def skipped_items(self) -> list[str]:
        return sorted(self._skipped)

    def calibration_batches(self, shard: int, n_shards: int, n_images: int, batch_size: int,
                            seed: int, start: int = 0) -> Iterator[list[Tensor]]:
        """Unlabelled training images: this shard's part of a seeded choice of ``n_images``
        (:func:`bgd_dist.sharding.calibration_items`; cycled if the set is smaller)."""
        split = self._split("train")
        idx, seeds = calibration_items(len(split), shard, n_shards, n_images, seed, start)
        for chunk, chunk_seeds in zip(chunks(idx.tolist(), batch_size), chunks(seeds.tolist(), batch_size)):
            images = [x for x in (self._load(split, i) for i in chunk) if x is not None]
            if self.data.calibration == "photos":   # the same sizes, cut from natural photographs
                images = [photo_crop(s, *x.shape[-2:]).to(x.dtype) for x, s in zip(images, chunk_seeds)]
            if images:
                yield images

    def train_batches(self, shard: int, n_shards: int, batch_size: int, seed: int,
                      start_step: int = 0) -> Iterator[Any]:
        """Endless augmented batches (horizontal flips: an image is flipped when its augmentation
        seed is odd), this shard's slice of each global batch (:func:`bgd_dist.sharding.train_items`).
        Labelled (``{"images", "targets"}``) when the loss needs labels."""
        split = self._split("train")
        labelled = self.data.loss != "distill"
        cat_to_label = {c: l for l, c in self.label_to_category().items()} if labelled else {}
        for idx, seeds in train_items(len(split), shard, n_shards, batch_size, seed, start_step):
            flip = ((seeds % 2) == 1) & self.data.hflip
            images, targets = [], []
            for i, f in zip(idx.tolist(), flip.tolist()):
                img = self._load(split, i)
                if img is None:
                    continue
                target = split.target(i, cat_to_label) if labelled else None
                if f:
                    img = img.flip(-1)
                    if target is not None:
                        w = img.shape[-1]
                        b = target["boxes"]
                        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
                        target["masks"] = target["masks"].flip(-1)
                images.append(img)
                targets.append(target)
            if images:
                yield {"images": images, "targets": targets} if labelled else images

    def eval_batches(self, shard: int, n_shards: int, max_images: int | None) -> Iterator[dict]:
        """Validation images in id order (all, or a fixed seeded subset of ``max_images``:
        :func:`bgd_dist.sharding.eval_items`), this shard's every ``n_shards``-th one:
        ``{"images": [...], "image_ids": [...]}``."""
        split = self._split("val")
        for chunk in chunks(eval_items(len(split), shard, n_shards, max_images).tolist(), self.data.eval_batch_size):
            loaded = [(self._load(split, i), split.image_id(i)) for i in chunk]
            loaded = [(x, image_id) for x, image_id in loaded if x is not None]
            if loaded:
                yield {"images": [x for x, _ in loaded], "image_ids": [image_id for _, image_id in loaded]}

    def to_device(self, batch, device):
        if isinstance(batch, dict):
            out = dict(batch)
            out["images"] = [x.to(device) for x in batch["images"]]
            if batch.get("targets") is not None:
                out["targets"] = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
            return out
        return [x.to(device) for x in batch]

    def batch_len(self, batch) -> int:
        return len(_images(batch))

    # -- forward --------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch) -> MaskRCNNOutputs:
        """The network step by step, keeping what :meth:`distill_loss` compares.

        With gradients disabled (teacher targets, statistics collection) the RoI heads run
        on the model's own proposals, as at inference. With gradients enabled (the student
        being distilled) they are left to :meth:`distill_loss`, which runs them on the
        teacher's boxes; labelled batches also get the standard losses then.
        """
        images = _images(batch)
        targets = batch.get("targets") if isinstance(batch, dict) else None
        image_list, targets = model.transform(images, targets)
        features = model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        levels = list(features.values())
        rpn = model.rpn
        obj_levels, delta_levels = rpn.head(levels)
        anchors = rpn.anchor_generator(image_list, levels)
        per_level = [o[0].numel() for o in obj_levels]
        objectness, deltas = concat_box_prediction_layers(obj_levels, delta_levels)
        out = MaskRCNNOutputs(model, features, list(image_list.image_sizes), objectness, deltas)
        if torch.is_grad_enabled():
            if targets is not None and targets[0] is not None and self.data.loss != "distill":
                out.supervised = self._supervised_losses(model, image_list, features, anchors, objectness, deltas,
                                                         per_level, targets)
            return out
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, out.image_sizes, per_level)
        self._run_heads(out, [b[:self.data.distill.box_rois] for b in boxes])  # sorted by objectness
        return out

    def _run_heads(self, out: MaskRCNNOutputs, proposals: list[Tensor], mask_from: MaskRCNNOutputs | None = None):
        """Box head on ``proposals``; mask head on ``mask_from``'s mask boxes (default: this pass's
        top-scoring refined proposals)."""
        roi = out.model.roi_heads
        box_features = roi.box_head(roi.box_roi_pool(out.features, proposals, out.image_sizes))
        out.proposals = proposals
        out.class_logits, deltas = roi.box_predictor(box_features)
        out.box_deltas = deltas.reshape(len(deltas), -1, 4)[:, 1:]
        if not roi.has_mask():
            return out
        if mask_from is None:
            out.mask_boxes, out.mask_labels, out.mask_scores = self._top_detections(out)
        else:
            out.mask_boxes, out.mask_labels, out.mask_scores = \
                mask_from.mask_boxes, mask_from.mask_labels, mask_from.mask_scores
        logits = roi.mask_predictor(roi.mask_head(roi.mask_roi_pool(out.features, out.mask_boxes, out.image_sizes)))
        out.mask_logits = logits[torch.arange(len(logits), device=logits.device), out.mask_labels]
        return out

    @torch.no_grad()
    def _top_detections(self, out: MaskRCNNOutputs):
        """Per image the ``mask_rois`` proposals of highest foreground probability, refined by the
        box deltas of their most probable class: (boxes list, labels, scores)."""
        roi = out.model.roi_heads
        k = self.data.distill.mask_rois
        probs = F.softmax(out.class_logits, -1)
        scores, fg = probs[:, out.foreground].max(1)
        decoded = roi.box_coder.decode(out.box_deltas.flatten(1), out.proposals)  # (ΣP, C - 1, 4)
        refined = decoded[torch.arange(len(fg), device=fg.device), fg]
        labels = fg + 1
        boxes, all_labels, all_scores = [], [], []
        start = 0
        for props, size in zip(out.proposals, out.image_sizes):
            n = len(props)
            s = scores[start:start + n]
            top = s.topk(min(k, n)).indices
            b = box_ops.clip_boxes_to_image(refined[start:start + n][top], size)
            boxes.append(b)
            all_labels.append(labels[start:start + n][top])
            all_scores.append(s[top])
            start += n
        return boxes, torch.cat(all_labels), torch.cat(all_scores)

    def _supervised_losses(self, model, image_list, features, anchors, objectness, deltas, per_level,
                           targets) -> dict:
        """torchvision's Mask R-CNN training losses, reusing this pass's features and RPN outputs."""
        rpn = model.rpn
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = rpn.box_coder.encode(matched, anchors)
        loss_objectness, loss_rpn_box = rpn.compute_loss(objectness, deltas, labels, regression_targets)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        with _training_flag(rpn, model.roi_heads):
            boxes, _ = rpn.filter_proposals(proposals, objectness, list(image_list.image_sizes), per_level)
            _, losses = model.roi_heads(features, boxes, list(image_list.image_sizes), targets)
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box, **losses}

    def predict(self, model: nn.Module, batch) -> list[dict]:
        """Eval-mode detections (boxes xyxy in image pixels, labels, scores, masks (N, 1, H, W)), CPU."""
        model.eval()
        with torch.no_grad():
            outputs = model(_images(batch))
        return [{k: v.cpu() for k, v in o.items()} for o in outputs]

    # -- loss -----------------------------------------------------------------------------------
    def distill_loss(self, student_out: MaskRCNNOutputs, teacher_out: MaskRCNNOutputs) -> Tensor:
        """``sum(weight[k] * term[k])`` (module docstring); the terms of the last call are kept in
        ``self.last_terms`` (floats, for logging)."""
        w = self.data.distill
        s, t = student_out, teacher_out
        terms: dict[str, Tensor] = {}
        if self.data.loss != "supervised":
            if w.features:
                per_level = [F.mse_loss(s.features[k], t.features[k]) / t.features[k].pow(2).mean().clamp_min(1e-12)
                             for k in t.features]
                terms["features"] = torch.stack(per_level).mean()
            if w.rpn_objectness:
                terms["rpn_objectness"] = _binary_kl(s.objectness, t.objectness).mean()
            if w.rpn_boxes:
                p = torch.sigmoid(t.objectness).reshape(-1)
                l1 = F.smooth_l1_loss(s.rpn_deltas, t.rpn_deltas, beta=1 / 9, reduction="none").sum(1)
                terms["rpn_boxes"] = (p * l1).sum() / p.sum().clamp_min(1e-6)
            if w.box_cls or w.box_reg or w.mask:
                if t.class_logits is None:
                    raise ValueError("distill_loss: the teacher's outputs lack the RoI heads (run the teacher "
                                     "under torch.no_grad())")
                heads = MaskRCNNOutputs(s.model, s.features, s.image_sizes, s.objectness, s.rpn_deltas,
                                        foreground=s.foreground)
                self._run_heads(heads, t.proposals, mask_from=t)
                if w.box_cls:
                    temp = w.temperature
                    terms["box_cls"] = F.kl_div(F.log_softmax(heads.class_logits / temp, -1),
                                                F.softmax(t.class_logits / temp, -1),
                                                reduction="batchmean") * temp ** 2
                if w.box_reg:
                    p = F.softmax(t.class_logits, -1)[:, t.foreground]
                    l1 = F.smooth_l1_loss(heads.box_deltas, t.box_deltas, beta=1 / 9, reduction="none").sum(-1)
                    terms["box_reg"] = (p * l1).sum() / p.sum().clamp_min(1e-6)
                if w.mask and t.mask_logits is not None and len(t.mask_logits):
                    per_roi = _binary_kl(heads.mask_logits, t.mask_logits).flatten(1).mean(1)
                    terms["mask"] = (t.mask_scores * per_roi).sum() / t.mask_scores.sum().clamp_min(1e-6)
        if self.data.loss != "distill":
            if s.supervised is None:
                raise ValueError("distill_loss: the supervised loss needs labelled batches (data.loss "
                                 f"{self.data.loss!r}) and the student's forward with gradients enabled")
            terms["supervised"] = sum(s.supervised.values())
        if not terms:
            raise ValueError("distill_loss: every loss weight is zero")
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        weights = {"features": w.features, "rpn_objectness": w.rpn_objectness, "rpn_boxes": w.rpn_boxes,
                   "box_cls": w.box_cls, "box_reg": w.box_reg, "mask": w.mask,
                   "supervised": w.supervised if self.data.loss == "both" else 1.0}
        return sum(weights[k] * v for k, v in terms.items())

    # -- evaluation -----------------------------------------------------------------------------
    def evaluator(self):
        from .evaluation import COCOEvaluator

        return COCOEvaluator(require(self.data.val_annotations, "data.val_annotations"), self.label_to_category())
