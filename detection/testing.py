"""Tiny Mask R-CNN pipelines (random weights, 64-pixel images) for tests and quick checks."""

import copy

from bgd_dist.config import pipeline_from_dict

TINY_KWARGS = {"num_classes": 4, "widths": [8, 16, 16, 32], "fpn_channels": 16, "representation_size": 32,
               "mask_layers": [16, 16], "mask_dim_reduced": 16, "min_size": 64, "max_size": 64,
               "anchor_sizes": [8, 16, 32, 64, 128], "box_detections_per_img": 10}

RULES = [
    {"match": r"backbone\.body\.conv1|rpn\.head\.cls_logits|rpn\.head\.bbox_pred|"
              r"roi_heads\.mask_predictor\.mask_fcn_logits", "skip": True},
    {"match": r"roi_heads\.box_head\.fc6", "block_size": 16},
    {"match": ".*", "kind": "linear", "block_size": 4},
    {"match": ".*", "kind": "conv_transpose2d", "block_size": 4},
    {"match": ".*", "kernel": [3, 3], "block_size": 9},
    {"match": ".*", "kernel": [1, 1], "block_size": 4},
]


def tiny_config(paths: dict, **sections):
    """The tiny pipeline over the dataset ``paths`` (the data section of :func:`detection.shapes.make_shapes`);
    ``sections`` update the top-level sections (one level deep)."""
    raw = {
        "name": "tiny_maskrcnn",
        "model": {"adapter": "maskrcnn", "arch": "maskrcnn_small", "kwargs": dict(TINY_KWARGS)},
        "data": {**paths, "example_size": 64, "eval_batch_size": 4,
                 "distill": {"box_rois": 16, "mask_rois": 4}},
        "quantize": {"n_iter": 4, "n_calibration": 8, "batch_size": 2, "seed": 1, "n_centroids": 16,
                     "rules": copy.deepcopy(RULES)},
        "finetune": {"layerwise": {"iterations": 2, "batch_size": 2, "lr": 0.01},
                     "global": {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "lr": 0.001}},
        "executor": {"kind": "serial", "num_workers": 2},
        "eval": {"max_images": 4},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return pipeline_from_dict(raw)
