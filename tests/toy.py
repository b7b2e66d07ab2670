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


def quantized_toy(**sections):
    """``(cfg, adapter, teacher, plan, student, executor)``: :func:`toy_setup` with every planned layer
    of a copy of the teacher quantized by a short weights-only k-means, and a started one-shard
    serial executor."""
    from bgd_dist.core.kmeans import fit_codebook
    from bgd_dist.executor import SerialExecutor
    from bgd_dist.nn.modules import get_submodule, quantize_

    cfg, adapter, teacher, plan = toy_setup(**sections)
    student = copy.deepcopy(teacher)
    codebooks = {}
    for l in plan.quantized:
        w = get_submodule(student, l.name).weight.detach()
        codebooks[l.name] = fit_codebook(w, l.geometry, None, l.n_centroids, l.block_size, 4)
    quantize_(student, plan, codebooks)
    executor = SerialExecutor(num_shards=1)
    executor.start(cfg.model, cfg.data)
    return cfg, adapter, teacher, plan, student, executor

