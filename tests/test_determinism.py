"""The pipeline is deterministic: the same configuration writes the same bytes, on either executor."""

import pytest

from bgd_dist.runner import run

from toy import toy_config


def model_bytes(cfg, out):
    run(cfg, out, do_eval=False, progress=False)
    return (out / "model.bgd").read_bytes()


@pytest.mark.slow
def test_two_ray_runs_write_identical_files(ray_cluster, tmp_path):
    cfg = toy_config(executor={"kind": "ray", "num_workers": 2})
    first = model_bytes(cfg, tmp_path / "a")
    assert model_bytes(cfg, tmp_path / "b") == first


def test_two_serial_runs_write_identical_files(tmp_path):
    cfg = toy_config()
    assert model_bytes(cfg, tmp_path / "a") == model_bytes(cfg, tmp_path / "b")
