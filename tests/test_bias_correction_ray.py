"""Bias correction, held-out statistics and the teacher target on the Ray executor: the same
corrected tensors, codebooks, input errors and held-out objectives as the in-process executor."""

import json

import pytest
import torch

from bgd_dist.rundir import corrected_from
from bgd_dist.runner import run

from toy import BASE, toy_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ray_and_serial_correct_the_same_biases(ray_cluster, tmp_path):
    results = {}
    for kind in ("ray", "serial"):
        cfg = toy_config(quantize={**BASE["quantize"], "bias_correction": True, "holdout": 0.25,
                                   "objective": "hessian", "hessian": {"target": "teacher", "max_input_error": 10}},
                         finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}},
                         executor={"kind": kind, "num_workers": 2})
        out = tmp_path / kind
        run(cfg, out, do_eval=False, progress=False)
        tensors = {}
        for s in range(3):
            stage = torch.load(out / f"stages/{s}/codebooks.pt", weights_only=True)
            tensors.update(corrected_from(stage))
            tensors.update({k: v for k, v in stage.items() if k.endswith((".centroids", ".assignments"))})
        held = {e["layer"]: (e["objective_holdout"], e.get("input_error"))
                for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["event"] == "layer"}
        results[kind] = tensors, held
    (t_ray, h_ray), (t_serial, h_serial) = results["ray"], results["serial"]
    assert {k for k in t_ray if not k.endswith(("centroids", "assignments"))} == {"bn2.bias", "bn3.bias", "fc.bias"}
    assert set(t_ray) == set(t_serial) and len(t_ray) > 3
    assert sum(err is not None and err > 0 for _, err in h_ray.values()) >= 2   # teacher-target layers
    for k in t_ray:
        assert torch.equal(t_ray[k], t_serial[k]), k
    assert h_ray == h_serial
