"""The start-up checks as plain functions (no cluster): placement arithmetic and its advice, data
paths, the executor settings, and how the CLI turns errors into exit codes."""

import pytest
from ray.exceptions import RayTaskError

from bgd_dist.cli import exit_code, one_line
from bgd_dist.config import ConfigError
from bgd_dist.distributed.ray_executor import resource_problem, unreadable_paths

from toy import toy_config


def test_a_demand_that_fits_is_no_problem():
    assert resource_problem({}, 8, [{"CPU": 2}]) is None                       # CPU actors ask nothing
    assert resource_problem({"GPU": 1}, 8, [{"GPU": 8}]) is None
    assert resource_problem({"GPU": 0.5, "stats": 1}, 4, [{"GPU": 1, "stats": 2}] * 2) is None


def test_a_demand_that_cannot_fit_says_the_numbers_and_what_fits():
    message = resource_problem({"GPU": 1}, 8, [{"CPU": 2}])
    assert "8 stats actors asking GPU 1 each" in message and "can hold 0 of them" in message
    assert "--set executor.num_gpus_per_worker=0" in message and "num_workers" not in message

    message = resource_problem({"GPU": 1}, 4, [{"GPU": 1}, {"GPU": 2}])   # per node: 1 + 2 = 3 fit
    assert "can hold 3 of them (per node: GPU 1; GPU 2)" in message
    assert "--set executor.num_workers=3" in message and "--set executor.num_gpus_per_worker=0.66" in message
    assert resource_problem({"GPU": 0.66}, 4, [{"GPU": 1}, {"GPU": 2}]) is None   # the advice fits

    # node by node, not in total: 2 x 0.75 GPU equal the total of 1.5, but one node holds only one
    assert resource_problem({"GPU": 0.75}, 2, [{"GPU": 1}, {"GPU": 0.5}]) is not None
    message = resource_problem({"stats": 1}, 2, [{"CPU": 4}])
    assert "no node has 'stats'" in message and "executor.actor_resources.stats" in message


def test_unreadable_paths_names_the_missing_ones(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "ckpt.pth").write_bytes(b"x")
    paths = {"data.train": str(tmp_path / "train"), "model.checkpoint": tmp_path / "ckpt.pth",
             "data.val": str(tmp_path / "val"), "data.none": None}
    assert unreadable_paths(paths) == [("data.val", str(tmp_path / "val"))]


def test_adapters_declare_their_data_paths(tmp_path):
    from bgd_dist.adapters import make_adapter

    cfg = toy_config(data={"data_dir": str(tmp_path)})
    assert make_adapter(cfg.model, cfg.data).data_paths() == {"data.data_dir": str(tmp_path)}
    cfg = toy_config()
    assert make_adapter(cfg.model, cfg.data).data_paths() == {}

    from bgd_dist.config import ModelConfig
    from classification.adapter import ClassificationAdapter

    model = ModelConfig(adapter="classification", arch="resnet18", checkpoint="/ckpt.pth")
    assert ClassificationAdapter(model, {"train": "/data/train", "val": "???"}).data_paths() == {
        "data.train": "/data/train", "model.checkpoint": "/ckpt.pth"}


@pytest.mark.parametrize("key, value, message", [
    ("actor_resources", {"stats": 0}, "actor_resources.stats: expected a positive number"),
    ("schedule_timeout_s", -1, "schedule_timeout_s: must be >= 0"),
    ("start_timeout_s", 0, "start_timeout_s: must be > 0"),
])
def test_executor_settings_are_checked_by_name(key, value, message):
    with pytest.raises(ConfigError, match=message):
        toy_config(executor={"kind": "ray", key: value})


def test_exit_codes_and_one_line_messages():
    assert exit_code(ConfigError("x")) == 2 and exit_code(FileNotFoundError("data.val: /x does not exist")) == 2
    assert exit_code(RuntimeError("the cluster is gone")) == 1 and exit_code(OSError("disk full")) == 1
    remote = RayTaskError("collect", "Traceback (most recent call last):\n  File ...\nValueError: layer 'fc': bad",
                          ValueError("layer 'fc': bad")).as_instanceof_cause()
    assert isinstance(remote, ValueError) and exit_code(remote) == 1   # raised in a worker: a run-time failure
    assert one_line(remote) == "ValueError: layer 'fc': bad"
    assert one_line(RuntimeError("first\nsecond")) == "first" and one_line(KeyError()) == "KeyError"
