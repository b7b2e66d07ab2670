"""cluster.yaml is a valid Ray cluster launcher config with GPU workers that install this project."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load(), schema)


def test_cluster_yaml_fields_the_launcher_needs():
    cfg = load()
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"]
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    workers = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert workers and all(n["resources"].get("GPU", 0) >= 1 and "node_config" in n for n in workers)
    assert sum(n.get("max_workers", 0) for n in workers) <= cfg["max_workers"]
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.14.1" in setup and "torchvision==0.29.1" in setup and "bgd-dist" in setup
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])
