"""Tiny pipelines over bgd_dist.testing.ToyAdapter, shared by the driver tests."""

import copy

from bgd_dist.config import pipeline_from_dict

BASE = {
    "name": "toy",
    "model": {"adapter": "bgd_dist.testing:ToyAdapter", "arch": "toy", "kwargs": {"width": 8}},
    "data": {"n_images": 64, "image_size": 12},
    "quantize": {
        "n_iter": 8, "n_calibration": 32, "batch_size": 8, "seed": 3,
        "rules": [
            {"match": "conv1", "skip": True},
            {"match": "fc", "block_size": 4, "n_centroids": 8},
            {"match": ".*", "kernel": [3, 3], "block_size": 9, "n_centroids": 32},
            {"match": ".*", "kernel": [1, 1], "block_size": 4, "n_centroids": 16},
        ],
    },
    "finetune": {
        "layerwise": {"iterations": 3, "batch_size": 8, "lr": 0.01},
        "global": {"epochs": 1, "iterations_per_epoch": 3, "batch_size": 8, "lr_step_epochs": 1, "lr": 0.001},
    },
    "executor": {"kind": "serial", "num_workers": 2},
    "eval": {"max_images": 32},
}


def toy_config(**sections):
    raw = copy.deepcopy(BASE)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return pipeline_from_dict(raw)


def toy_setup(**sections):
    """``(cfg, adapter, teacher, plan)`` of :func:`toy_config` (the traced plan of its teacher)."""
    from bgd_dist.adapters import make_adapter, plan_for

    cfg = toy_config(**sections)
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model()
    return cfg, adapter, teacher, plan_for(cfg, teacher, adapter)
