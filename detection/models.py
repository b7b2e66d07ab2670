"""Mask R-CNN models from torchvision: the paper's R50-FPN, or smaller ones built from a config.

Every model is a plain torchvision :class:`~torchvision.models.detection.MaskRCNN`
(same heads, same module names: ``backbone.body``, ``backbone.fpn``,
``rpn.head``, ``roi_heads.box_head.fc6``, ``roi_heads.mask_predictor.conv5_mask``
...), so the same quantization rules apply to all of them.

Normalisation: trained detectors use frozen batch norm (the paper's model).
:class:`FrozenBatchNorm2d` here is torchvision's, except that the affine
``weight``/``bias`` are (frozen, ``requires_grad=False``) *parameters* rather
than buffers: the paper's size accounting counts BN affine weights as "other"
fp32 parameters (METHOD.md §5; 169.58 MB -> 6.65 MB for R50-FPN), and
distillation never trains them. State-dict keys are torchvision's, so COCO
checkpoints load unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.resnet import BasicBlock
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_ops

from bgd_dist.seeds import fixed_init

ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_small")


class FrozenBatchNorm2d(misc_ops.FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d with ``weight``/``bias`` as frozen parameters (see the
    module docstring); running statistics stay buffers. Same forward, same state-dict keys."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        for name in ("weight", "bias"):
            value = self._buffers.pop(name)
            setattr(self, name, nn.Parameter(value, requires_grad=False))


def set_bn_eps(model: nn.Module, eps: float) -> None:
    """Set the eps of every frozen BN (the Detectron-trained COCO weights use 0)."""
    for m in model.modules():
        if isinstance(m, misc_ops.FrozenBatchNorm2d):
            m.eps = eps


class ResNetBody(nn.Module):
    """A ResNet trunk of :class:`~torchvision.models.resnet.BasicBlock` with configurable widths.

    Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``,
    ``layer2.0.downsample.0`` ...), so the paper's rules (``backbone\\.body\\.conv1``
    left uncompressed) apply unchanged. (n, 3, H, W) -> ``layer4`` at stride 32.
    """

    def __init__(self, widths=(32, 64, 128, 256), blocks=(1, 1, 1, 1), norm_layer=FrozenBatchNorm2d):
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError(f"model.kwargs: widths and blocks need 4 entries, got {widths} and {blocks}")
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = widths[0]
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != planes):
                    downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                               norm_layer(planes))
                layers.append(BasicBlock(inplanes, planes, stride if j == 0 else 1, downsample,
                                         norm_layer=norm_layer))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _norm(norm: str):
    if norm in ("frozen_bn", "frozen"):
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    raise ValueError(f"model.kwargs.norm: expected frozen_bn or bn, got {norm!r}")


@fixed_init()
def build_small_maskrcnn(num_classes: int = 4, backbone: str = "resnet_body", widths=(32, 64, 128, 256),
                         blocks=(1, 1, 1, 1), fpn_channels: int = 64, representation_size: int = 256,
                         mask_layers=(64, 64, 64, 64), mask_dim_reduced: int = 64, min_size: int = 128,
                         max_size: int = 128, anchor_sizes=(16, 32, 64, 128, 256),
                         aspect_ratios=(0.5, 1.0, 2.0), norm: str = "frozen_bn", **maskrcnn_kwargs) -> MaskRCNN:
    """A torchvision ``MaskRCNN`` sized by its config, for CPUs and tests.

    ``backbone``: ``resnet_body`` (a :class:`ResNetBody` of ``widths``/``blocks``) or a
    torchvision ResNet name (``resnet18``, ``resnet50`` ...; random init, FPN of
    ``fpn_channels``). ``norm``: ``frozen_bn`` (inference and compression) or ``bn``
    (training from scratch; same state-dict keys, so a trained ``bn`` model loads
    into the ``frozen_bn`` one). Other keyword arguments go to ``MaskRCNN``
    (``rpn_post_nms_top_n_test``, ``box_detections_per_img`` ...). Eval mode.
    """
    norm_layer = _norm(norm)
    return_layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
    if backbone == "resnet_body":
        body = ResNetBody(tuple(widths), tuple(blocks), norm_layer)
        fpn_backbone = BackboneWithFPN(body, return_layers, list(widths), fpn_channels)
    else:
        try:
            trunk = torchvision.models.get_model(backbone, weights=None, norm_layer=norm_layer)
        except (ValueError, TypeError) as e:
            raise ValueError(f"model.kwargs.backbone: {backbone!r} is not resnet_body or a torchvision "
                             f"ResNet ({e})") from None
        stage = trunk.inplanes // 8  # channels of layer1's output
        fpn_backbone = BackboneWithFPN(trunk, return_layers, [stage * 2 ** i for i in range(4)], fpn_channels)
    n_levels = 5  # four FPN levels and the max-pooled one
    if len(anchor_sizes) != n_levels:
        raise ValueError(f"model.kwargs.anchor_sizes: need {n_levels} sizes (one per FPN level), got {anchor_sizes}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * n_levels)
    c = fpn_channels
    defaults = dict(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                    rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128, box_batch_size_per_image=64,
                    box_detections_per_img=20)
    defaults.update(maskrcnn_kwargs)
    model = MaskRCNN(
        fpn_backbone, num_classes=None, min_size=min_size, max_size=max_size, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
        box_head=TwoMLPHead(c * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2),
        mask_head=MaskRCNNHeads(c, list(mask_layers), 1),
        mask_predictor=MaskRCNNPredictor(mask_layers[-1], mask_dim_reduced, num_classes),
        **defaults)
    return model.eval()


def resolve_checkpoint(path: str) -> Path:
    """``path`` as given, or relative to the repository (``detection/assets/...`` from anywhere)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    repo = Path(__file__).resolve().parent.parent
    return repo / p if (repo / p).is_file() else p


def build_maskrcnn(arch: str = "maskrcnn_resnet50_fpn", weights: str | None = None,
                   checkpoint: str | None = None, norm: str | None = None, bn_eps: float | None = None,
                   **kwargs) -> nn.Module:
    """A Mask R-CNN in eval mode: ``maskrcnn_resnet50_fpn`` (the paper's model) or
    ``maskrcnn_small`` (:func:`build_small_maskrcnn`, configured by ``kwargs``).

    ``weights``: a torchvision enum name (``COCO_V1``), downloaded where the
    network allows; ``checkpoint``: a local state dict (fp16 entries are cast to
    the model's dtype). Without either the model is randomly initialised.
    For R50-FPN, ``norm`` (``frozen_bn`` or ``bn``) defaults to torchvision's
    choice (frozen BN for trained weights, BN for a random model) and ``bn_eps``
    to 0 for the torchvision ``weights`` (Detectron-trained) and 1e-5 for a random
    model; with a local ``checkpoint`` ``bn_eps`` must be given. Other ``kwargs``
    go to ``MaskRCNN`` (``min_size``, ``max_size`` ...).
    """
    from classification.models import load_state_dict

    if arch not in ARCHS:
        raise ValueError(f"model.arch: unknown detection architecture {arch!r}; expected one of {list(ARCHS)}")
    if arch == "maskrcnn_small":
        if weights:
            raise ValueError("model.weights: maskrcnn_small has no published weights; use model.checkpoint")
        model = build_small_maskrcnn(norm=norm or "frozen_bn", **kwargs)
        if bn_eps is not None:
            set_bn_eps(model, bn_eps)
        if checkpoint:
            model.load_state_dict(load_state_dict(str(resolve_checkpoint(checkpoint))))
        return model.eval()
    kwargs.pop("weights_backbone", None)  # never downloaded: the trained weights replace it
    if norm is None:  # torchvision's choice: frozen BN for trained weights, BN for a random model
        norm = "frozen_bn" if (weights or checkpoint) else "bn"
    if bn_eps is None:
        if checkpoint and not weights:   # a state dict does not say which eps it was trained with
            raise ValueError("model.kwargs.bn_eps: required with model.checkpoint for maskrcnn_resnet50_fpn: 0.0 "
                             "for torchvision's COCO_V1 weights (Detectron-trained), 1e-5 for a detector trained "
                             "with torch's BatchNorm")
        bn_eps = 0.0 if weights else 1e-5  # COCO_V1 (Detectron) uses eps = 0
    model = _maskrcnn_resnet50_fpn(norm, **kwargs)
    set_bn_eps(model, bn_eps)
    if checkpoint:
        model.load_state_dict(load_state_dict(str(resolve_checkpoint(checkpoint))))
    elif weights:
        enum = torchvision.models.get_model_weights(torchvision.models.detection.maskrcnn_resnet50_fpn)
        try:
            w = enum[weights]
        except KeyError:
            raise ValueError(f"model.weights: {weights!r} is not one of {[e.name for e in enum]}") from None
        try:
            state = w.get_state_dict(progress=False, check_hash=True)
        except Exception as e:
            raise RuntimeError(
                f"could not download the {arch} weights {weights} ({type(e).__name__}: {e}). Offline, download "
                f"{w.url} elsewhere and pass it with --set model.checkpoint=/path/to/file.pth") from e
        model.load_state_dict(state)
    return model.eval()


@fixed_init()
def _maskrcnn_resnet50_fpn(norm: str, num_classes: int = 91, **kwargs) -> MaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn`` structure (same module names and state-dict keys)
    with the normalisation layer chosen here."""
    trunk = torchvision.models.resnet50(weights=None, norm_layer=_norm(norm))
    return MaskRCNN(_resnet_fpn_extractor(trunk, 5), num_classes=num_classes, **kwargs)


def bn_to_frozen_state(state: dict) -> OrderedDict:
    """A state dict of a ``norm="bn"`` model without ``num_batches_tracked`` (the keys of the
    ``frozen_bn`` model)."""
    return OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
