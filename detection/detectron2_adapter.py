"""The detectron2 adapter: detectron2's Mask R-CNN (``mask_rcnn_R_50_FPN_3x``) behind the same interface.

Built with detectron2's documented API: the model-zoo config
(``model_zoo.get_config_file``), ``get_cfg``, ``build_model`` and
``DetectionCheckpointer``; inputs are detectron2's list of dicts with BGR
images in 0-255 resized to the test size (``{"image", "height", "width"}``),
outputs ``Instances`` converted to the torchvision-style dicts the COCO
evaluator reads. detectron2 is imported only when this adapter is used (it is
not on PyPI: ``make detectron2`` builds it from source).

detectron2 keeps some layers in plain Python lists besides registering them
(the FPN's ``lateral_convs`` / ``output_convs``, which its forward iterates):
replacing the registered child (quantization, loading a compressed file)
would leave the forward running the old dense layer. :func:`children_by_name`
turns every such list into a view that looks the children up by name, so the
forward always runs the module the model holds now.

The compressed file records the architecture as plain JSON
(:meth:`Detectron2Adapter.arch`): the model-zoo config name, the config
overrides, the number of classes, the input format (BGR), the pixel mean and
std and the test-time sizes, resolved from detectron2's config when the file
is written, so loading rebuilds the same network even if the zoo defaults
change.

Layers are found by module type (detectron2's ``Conv2d`` is an ``nn.Conv2d``,
its ``ConvTranspose2d`` an ``nn.ConvTranspose2d``), so the same rules apply.
detectron2's ``Conv2d`` runs its norm and activation inside the module;
:func:`unfuse_conv_norm` splits every such module into a plain convolution
``<name>.conv`` followed by ``<name>.norm`` and the activation, so quantizing
the convolution keeps the other two. :data:`PAPER_RULES` is the paper's
allocation in detectron2's names. Distillation uses the same loss as the
torchvision adapter (:mod:`detection.adapter`): features, RPN, box head on the
teacher's proposals, mask head on the teacher's detections. detectron2's class
logits put the background last. The supervised option is torchvision-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgd_dist.seeds import fixed_init

from .adapter import MaskRCNNAdapter, MaskRCNNOutputs, _images
from .coco import category_mapping

DEFAULT_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
INSTALL_HINT = ("detectron2 is not installed; it is not on PyPI: build it from source with `make detectron2`, "
                "or pip install 'setuptools>=70.1,<81' and then pip install --no-build-isolation "
                "'git+https://github.com/facebookresearch/detectron2.git'")

PAPER_RULES = [
    {"match": r"backbone\.bottom_up\.stem\.conv1\.conv|proposal_generator\.rpn_head\.objectness_logits|"
              r"proposal_generator\.rpn_head\.anchor_deltas|roi_heads\.mask_head\.predictor", "skip": True},
    {"match": r"roi_heads\.box_head\.fc1", "block_size": 16},
    {"match": ".*", "kind": "linear", "block_size": 4},
    {"match": ".*", "kind": "conv_transpose2d", "block_size": 4},     # roi_heads.mask_head.deconv
    {"match": ".*", "kernel": [3, 3], "block_size": 9},
    {"match": ".*", "kernel": [1, 1], "block_size": 4},
]


def detectron2_available() -> bool:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def require_detectron2() -> None:
    if not detectron2_available():
        raise ImportError(INSTALL_HINT)


def config_path(config: str) -> str:
    """A model-zoo config name (``mask_rcnn_R_50_FPN_3x`` or ``COCO-InstanceSegmentation/....yaml``)."""
    if not config.endswith(".yaml"):
        config = f"COCO-InstanceSegmentation/{config}.yaml"
    return config


class ConvNormAct(nn.Module):
    """detectron2's Conv2d split in three: a plain ``conv``, then ``norm``, then ``activation``."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module | None, activation):
        super().__init__()
        self.conv = conv
        self.norm = norm
        if isinstance(activation, nn.Module):
            self.activation = activation
        else:
            self.activation = None
            self.activation_fn = activation   # a plain function such as F.relu (picklable by reference)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        elif getattr(self, "activation_fn", None) is not None:
            x = self.activation_fn(x)
        return x


class ChildList(Sequence):
    """A read-only list of a module's children, looked up by name at every access."""

    def __init__(self, owner: nn.Module, names: list[str]):
        self.owner = owner
        self.names = list(names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [getattr(self.owner, n) for n in self.names[i]]
        return getattr(self.owner, self.names[i])

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ChildList({self.names})"


def children_by_name(model: nn.Module) -> nn.Module:
    """Replace, in every module, each plain list (or tuple) of its own registered children by a
    :class:`ChildList` of their names, in place: swapping a child then changes what the list
    yields too."""
    for module in model.modules():
        ids = {id(child): name for name, child in module._modules.items() if child is not None}
        for key, value in list(vars(module).items()):
            if key.startswith("_") or not isinstance(value, (list, tuple)) or not value:
                continue
            if all(isinstance(v, nn.Module) and id(v) in ids for v in value):
                object.__setattr__(module, key, ChildList(module, [ids[id(v)] for v in value]))
    return model


def unfuse_conv_norm(model: nn.Module) -> nn.Module:
    """Replace every detectron2 ``Conv2d`` that has a norm or an activation by :class:`ConvNormAct`,
    in place. State-dict keys change from ``<name>.weight`` to ``<name>.conv.weight`` (norm keys stay)."""
    from detectron2.layers import Conv2d as D2Conv2d

    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, D2Conv2d) and (getattr(m, "norm", None) is not None
                                                or getattr(m, "activation", None) is not None)]
    for name, m in targets:
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                         m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(m.weight)
            if m.bias is not None:
                conv.bias.copy_(m.bias)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ConvNormAct(conv, m.norm, m.activation))
    return model


def detectron2_config(config: str = DEFAULT_CONFIG, num_classes: int | None = None,
                      min_size_test: int | None = None, max_size_test: int | None = None,
                      opts: list | None = None, input_format: str | None = None,
                      pixel_mean: list | None = None, pixel_std: list | None = None):
    """detectron2's config for a model-zoo ``config``: ``opts`` (``[KEY, VALUE, ...]``, as
    ``cfg.merge_from_list``) first, then the named arguments that are given."""
    require_detectron2()
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    config = config_path(config)
    cfg = get_cfg()
    try:
        cfg.merge_from_file(model_zoo.get_config_file(config))
    except RuntimeError as e:       # model_zoo: "<name> not available in Model Zoo!"
        raise ValueError(f"detectron2 config {config!r}: {e}") from None
    cfg.MODEL.DEVICE = "cpu"
    if opts:
        if len(opts) % 2:
            raise ValueError(f"detectron2 opts must be KEY, VALUE pairs, got {len(opts)} items: {opts}")
        cfg.merge_from_list([str(o) for o in opts])
    if num_classes is not None:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = int(num_classes)
    if min_size_test is not None:
        cfg.INPUT.MIN_SIZE_TEST = int(min_size_test)
    if max_size_test is not None:
        cfg.INPUT.MAX_SIZE_TEST = int(max_size_test)
    if input_format is not None:
        cfg.INPUT.FORMAT = str(input_format)
    if pixel_mean is not None:
        cfg.MODEL.PIXEL_MEAN = [float(v) for v in pixel_mean]
    if pixel_std is not None:
        cfg.MODEL.PIXEL_STD = [float(v) for v in pixel_std]
    return cfg


def build_detectron2_maskrcnn(config: str = DEFAULT_CONFIG, weights: str | None = None,
                              num_classes: int | None = None, min_size_test: int | None = None,
                              max_size_test: int | None = None, opts: list | None = None,
                              input_format: str | None = None, pixel_mean: list | None = None,
                              pixel_std: list | None = None) -> nn.Module:
    """detectron2's model for a model-zoo ``config``, in eval mode on the CPU, with convs unfused
    and child lists looked up by name (:func:`children_by_name`).

    ``weights``: a checkpoint path or URL for ``DetectionCheckpointer``, or ``model_zoo`` for the
    config's published weights (downloaded where the network allows). The other arguments are
    those of :func:`detectron2_config`.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2 import model_zoo
    from detectron2.modeling import build_model

    cfg = detectron2_config(config, num_classes, min_size_test, max_size_test, opts, input_format,
                            pixel_mean, pixel_std)
    with fixed_init():   # a random model is the same in every process
        model = build_model(cfg)
    if weights:
        DetectionCheckpointer(model).load(model_zoo.get_checkpoint_url(config_path(config))
                                          if weights == "model_zoo" else weights)
    children_by_name(model)
    unfuse_conv_norm(model)
    model.bgd_test_size = (int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST))
    return model.eval()


class Detectron2Adapter(MaskRCNNAdapter):
    """Adapter protocol (see :mod:`bgd_dist.adapters`) for detectron2's Mask R-CNN.

    ``model.arch``: a model-zoo config (default ``mask_rcnn_R_50_FPN_3x``); ``model.weights``:
    ``model_zoo`` (the config's published weights); ``model.checkpoint``: a local file;
    ``model.kwargs``: ``num_classes``, ``min_size_test``, ``max_size_test``, ``opts``.
    """

    def __init__(self, model_config, data_config: dict | None = None):
        require_detectron2()
        super().__init__(model_config, data_config)
        if self.data.loss != "distill":
            raise ValueError("data.loss: the detectron2 adapter supports distill only (the supervised option "
                             "uses torchvision's losses)")

    # -- models ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        m = self.model_config
        weights = m.checkpoint or ("model_zoo" if m.weights else None)
        return build_detectron2_maskrcnn(m.arch or DEFAULT_CONFIG, weights, **m.kwargs)

    def preprocessing(self) -> dict:
        """detectron2's inputs: a list of ``{"image", "height", "width"}`` with the image resized to
        the test size (shorter side ``min_size``, longer at most ``max_size``), in ``input_format``
        channel order, values 0-255; the model subtracts ``mean`` and divides by ``std`` itself.
        Read from the resolved config (no model is built for it)."""
        a = self.arch()["kwargs"]
        return {"image": f"{a['input_format']}, values 0-255, resized by the caller to the test size; a list of "
                         f"{{'image': (3, H, W), 'height': h, 'width': w}}",
                "min_size": [a["min_size_test"]], "max_size": a["max_size_test"], "input_format": a["input_format"],
                "mean": a["pixel_mean"], "std": a["pixel_std"], "normalised_by_the_model": True}

    def arch(self) -> dict:
        """The architecture as plain JSON, resolved from detectron2's config: the zoo config name,
        the overrides (``opts``), the number of classes, the input format, the pixel mean and std
        and the test-time sizes."""
        kwargs = dict(self.model_config.kwargs)
        config = config_path(self.model_config.arch or DEFAULT_CONFIG)
        cfg = detectron2_config(config, **kwargs)
        resolved = {"config": config, "opts": [str(o) for o in kwargs.get("opts") or []],
                    "num_classes": int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
                    "input_format": str(cfg.INPUT.FORMAT),
                    "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
                    "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
                    "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST), "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST)}
        return {"factory": "detection.detectron2_adapter:build_detectron2_maskrcnn", "kwargs": resolved}

    @property
    def num_classes(self) -> int:
        return int(self.model_config.kwargs.get("num_classes", 80)) + 1

    def label_to_category(self) -> dict[int, int]:
        """detectron2's classes are 0-based and contiguous over the sorted category ids."""
        from bgd_dist.config import require

        annotations = require(self.data.val_annotations, "data.val_annotations")
        mapping = category_mapping(annotations, self.num_classes, "contiguous")
        return {label - 1: cat for label, cat in mapping.items()}

    def _inputs(self, model: nn.Module, images: list[Tensor]) -> list[dict]:
        """RGB [0, 1] tensors -> detectron2 inputs: resized to the test size, 0-255, BGR."""
        short, longest = model.bgd_test_size
        out = []
        for img in images:
            h, w = img.shape[-2:]
            scale = min(short / min(h, w), longest / max(h, w))
            nh, nw = int(round(h * scale)), int(round(w * scale))
            x = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0] * 255
            if model.input_format == "BGR":
                x = x.flip(0)
            out.append({"image": x, "height": h, "width": w})
        return out

    def trace(self, model: nn.Module):
        predictor = model.roi_heads.box_predictor
        saved = predictor.test_score_thresh, predictor.test_topk_per_image
        predictor.test_score_thresh, predictor.test_topk_per_image = -1.0, 8
        try:
            return self.predict(model, self.example_batch())
        finally:
            predictor.test_score_thresh, predictor.test_topk_per_image = saved

    # -- forward --------------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch) -> MaskRCNNOutputs:
        inputs = self._inputs(model, [x for x in _images(batch)])
        image_list = model.preprocess_image(inputs)
        features = model.backbone(image_list.tensor)
        rpn = model.proposal_generator
        levels = [features[f] for f in rpn.in_features]
        obj_levels, delta_levels = rpn.rpn_head(levels)
        box_dim = rpn.anchor_generator.box_dim
        objectness = torch.cat([o.permute(0, 2, 3, 1).flatten(1) for o in obj_levels], 1).reshape(-1, 1)
        deltas = torch.cat([d.view(d.shape[0], -1, box_dim, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2)
                            .flatten(1, -2) for d in delta_levels], 1).reshape(-1, box_dim)
        out = MaskRCNNOutputs(model, features, list(image_list.image_sizes), objectness, deltas,
                              foreground=slice(0, -1))
        if torch.is_grad_enabled():
            return out
        proposals, _ = rpn(image_list, features, None)          # sorted by objectness
        self._run_heads(out, [p.proposal_boxes.tensor[:self.data.distill.box_rois] for p in proposals])
        return out

    def _run_heads(self, out: MaskRCNNOutputs, proposals: list[Tensor], mask_from: MaskRCNNOutputs | None = None):
        from detectron2.structures import Boxes

        roi = out.model.roi_heads
        x = roi.box_pooler([out.features[f] for f in roi.box_in_features], [Boxes(b) for b in proposals])
        out.proposals = proposals
        out.class_logits, deltas = roi.box_predictor(roi.box_head(x))
        n_fg = out.class_logits.shape[1] - 1
        out.box_deltas = deltas.reshape(len(deltas), -1, 4).expand(-1, n_fg, -1)  # class-agnostic: shared
        if mask_from is None:
            out.mask_boxes, out.mask_labels, out.mask_scores = self._top_detections(out)
        else:
            out.mask_boxes, out.mask_labels, out.mask_scores = \
                mask_from.mask_boxes, mask_from.mask_labels, mask_from.mask_scores
        x = roi.mask_pooler([out.features[f] for f in roi.mask_in_features], [Boxes(b) for b in out.mask_boxes])
        logits = roi.mask_head.layers(x)                       # (M, K or 1, 28, 28)
        index = out.mask_labels if logits.shape[1] > 1 else torch.zeros_like(out.mask_labels)
        out.mask_logits = logits[torch.arange(len(logits), device=logits.device), index]
        return out

    @torch.no_grad()
    def _top_detections(self, out: MaskRCNNOutputs):
        from detectron2.structures import Boxes

        roi = out.model.roi_heads
        k = self.data.distill.mask_rois
        scores, labels = F.softmax(out.class_logits, -1)[:, out.foreground].max(1)
        rows = torch.arange(len(labels), device=labels.device)
        refined = roi.box_predictor.box2box_transform.apply_deltas(out.box_deltas[rows, labels],
                                                                   torch.cat(out.proposals))
        boxes, all_labels, all_scores = [], [], []
        start = 0
        for props, size in zip(out.proposals, out.image_sizes):
            n = len(props)
            top = scores[start:start + n].topk(min(k, n)).indices
            b = Boxes(refined[start:start + n][top].clone())
            b.clip(size)
            boxes.append(b.tensor)
            all_labels.append(labels[start:start + n][top])
            all_scores.append(scores[start:start + n][top])
            start += n
        return boxes, torch.cat(all_labels), torch.cat(all_scores)

    def predict(self, model: nn.Module, batch) -> list[dict]:
        model.eval()
        with torch.no_grad():
            outputs = model(self._inputs(model, list(_images(batch))))
        result = []
        for o in outputs:
            inst = o["instances"].to("cpu")
            result.append({"boxes": inst.pred_boxes.tensor, "labels": inst.pred_classes, "scores": inst.scores,
                           "masks": inst.pred_masks[:, None].float()})
        return result
