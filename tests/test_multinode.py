"""A Ray cluster of several nodes on one machine (``ray.cluster_utils.Cluster``: one raylet, object
store and resource set per node): placement across nodes, Ray == serial on it, a node lost in the
middle of a run, data paths checked on each node, resources the cluster cannot give.

The head has CPUs only; the two worker nodes carry the custom resource ``stats`` that the stats
actors ask for (``executor.actor_resources``), so no actor can land on the head.
"""

import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from bgd_dist import load_compressed
from bgd_dist.config import load_pipeline
from bgd_dist.distributed.ray_executor import RayExecutor
from bgd_dist.executor import SerialExecutor
from bgd_dist.finetune import PhaseSpec
from bgd_dist.runner import run
from bgd_dist.student import student_state

from toy import toy_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "digits.yaml"
SHORT = ["quantize.n_iter=8", "quantize.n_calibration=256", "finetune.layerwise.enabled=false",
         "finetune.global.enabled=false", "data.teacher_epochs=2"]
STATS = {"stats": 1}


@pytest.fixture(scope="module")
def cluster():
    """Head (2 CPUs, no ``stats``) + two worker nodes (1 CPU, ``stats: 2`` each: room for both actors
    on one node, so that losing a node can be recovered from). Shut down with its handle."""
    c = Cluster(initialize_head=True, connect=True,
                head_node_args={"num_cpus": 2, "include_dashboard": False})
    workers = [c.add_node(num_cpus=1, resources={"stats": 2}) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _record(executor, method: str, into: list):
    original = getattr(executor, method)

    def recording(*args, **kwargs):
        into.append(original(*args, **kwargs))
        return into[-1]

    setattr(executor, method, recording)


def _digits(tmp_path, *extra):
    return load_pipeline(PIPELINE, [f"data.cache_dir={tmp_path / 'cache'}", *SHORT, *extra])


def test_digits_on_two_worker_nodes_equals_the_serial_executor(cluster, tmp_path):
    c, workers = cluster
    cfg = _digits(tmp_path)
    recorded = {"ray": ([], []), "serial": ([], [])}
    ray_ex = RayExecutor(num_workers=2, actor_resources=STATS)
    serial = SerialExecutor(num_shards=2, threads=1)
    try:
        for name, ex in (("ray", ray_ex), ("serial", serial)):
            _record(ex, "collect", recorded[name][0])
            _record(ex, "fit", recorded[name][1])
            run(cfg, tmp_path / name, ex, do_eval=False, progress=False)

        # placed on the two worker nodes, one actor each, none on the head
        nodes = [p["node_id"] for p in ray_ex.placement]
        assert len(set(nodes)) == 2 and set(nodes) == {w.node_id for w in workers}
        assert c.head_node.node_id not in nodes

        (stats_r, fits_r), (stats_s, fits_s) = recorded["ray"], recorded["serial"]
        assert len(stats_r) == len(stats_s) > 1
        for a, b in zip(stats_r, stats_s):
            assert a.stats.keys() == b.stats.keys()
            for n in a.stats:
                torch.testing.assert_close(a.stats[n].gram, b.stats[n].gram, rtol=1e-9, atol=0)
                assert a.stats[n].n_rows == b.stats[n].n_rows > 0
        for a, b in zip(fits_r, fits_s):
            for n in a:
                assert torch.equal(a[n].codebook.assignments, b[n].codebook.assignments)
                torch.testing.assert_close(a[n].codebook.centroids, b[n].codebook.centroids, rtol=1e-6, atol=1e-7)
        assert (tmp_path / "ray" / "model.bgd").read_bytes() == (tmp_path / "serial" / "model.bgd").read_bytes()

        # distillation across the two nodes (gloo group) equals one worker with the global batch
        payload = student_state(load_compressed(tmp_path / "ray" / "model.bgd"))
        spec = PhaseSpec("layerwise", 3, 0.01, 0.9, 1e-4, 16, seed=4)
        one = SerialExecutor(num_shards=1, threads=1)
        one.start(cfg.model, cfg.data)
        one.load_student(payload)
        single = one.distill(spec)
        ray_ex.load_student(payload)
        parallel = ray_ex.distill(spec)
        for n, centroids in single.centroids.items():
            torch.testing.assert_close(parallel.centroids[n], centroids, rtol=1e-5, atol=1e-5)
    finally:
        ray_ex.close()


def test_a_path_missing_on_one_node_fails_fast_naming_the_node(cluster, tmp_path, monkeypatch):
    """``data.data_dir: ${BGD_TEST_DATA}`` expands on each node: the driver's points to a folder that
    exists, the extra node's (raylet environment) to one that does not, as on a node without the
    shared file system."""
    c, _ = cluster
    monkeypatch.setenv("BGD_TEST_DATA", str(tmp_path))
    odd = c.add_node(num_cpus=0, resources={"odd": 1}, env_vars={"BGD_TEST_DATA": str(tmp_path / "elsewhere")})
    c.wait_for_nodes()
    try:
        readable = toy_config(data={"n_images": 64, "image_size": 12, "data_dir": str(tmp_path)})
        ok = RayExecutor(num_workers=2, actor_resources=STATS, start_timeout_s=120)
        ok.start(readable.model, readable.data)   # the same folder, readable on the worker nodes
        ok.close()

        cfg = toy_config(data={"n_images": 64, "image_size": 12, "data_dir": "${BGD_TEST_DATA}"})
        bad = RayExecutor(num_workers=1, actor_resources={"odd": 1}, start_timeout_s=120)
        start = time.monotonic()
        with pytest.raises(RuntimeError) as e:
            bad.start(cfg.model, cfg.data)
        bad.close()
        assert time.monotonic() - start < 60
        message = str(e.value)
        assert f"data.data_dir={tmp_path / 'elsewhere'} is not readable on node" in message
        assert odd.node_id[:12] in message and "every node needs the data at the same path" in message
    finally:
        c.remove_node(odd)


def test_resources_that_never_fit_fail_at_once_with_the_settings_that_would(cluster):
    cfg = toy_config()
    for executor, fix in ((RayExecutor(num_workers=2, num_gpus_per_worker=1), "--set executor.num_gpus_per_worker=0"),
                          (RayExecutor(num_workers=5, actor_resources=STATS), "--set executor.num_workers=4"),
                          (RayExecutor(num_workers=1, actor_resources={"tpu_pod": 1}),
                           "drop executor.actor_resources.tpu_pod")):
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="cannot be placed") as e:
            executor.start(cfg.model, cfg.data)
        executor.close()
        assert time.monotonic() - start < 10
        assert fix in str(e.value)
        assert executor.actors == []


def test_resources_that_come_later_are_waited_for_and_the_wait_has_a_limit(cluster, caplog):
    c, _ = cluster
    cfg = toy_config()
    never = RayExecutor(num_workers=1, actor_resources={"later": 1}, schedule_timeout_s=2, start_timeout_s=2)
    with pytest.raises(RuntimeError, match="did not start within 4 s"):
        never.start(cfg.model, cfg.data)
    never.close()

    later = RayExecutor(num_workers=1, actor_resources={"later": 1}, schedule_timeout_s=120, start_timeout_s=60)
    failures, added = [], []

    def start():
        try:
            later.start(cfg.model, cfg.data)
        except Exception as e:  # reported by the assertion below
            failures.append(e)

    starting = threading.Thread(target=start)   # nodes are added from the main thread only (signals)
    try:
        with caplog.at_level("WARNING", logger="bgd_dist.distributed.ray_executor"):
            starting.start()
            time.sleep(3)
            assert starting.is_alive()   # waiting: no node has "later" yet
            added.append(c.add_node(num_cpus=0, resources={"later": 1}))
            starting.join(timeout=180)
        assert not starting.is_alive() and not failures, failures
        assert "waiting up to 120 s" in caplog.text
        assert [p["node_id"] for p in later.placement] == [added[0].node_id]
    finally:
        starting.join(timeout=200)
        later.close()
        for node in added:
            c.remove_node(node)


def test_a_node_lost_mid_run_is_recovered_on_the_other_node_then_named_when_none_is_left(cluster, tmp_path):
    """Runs last in the module: it removes both worker nodes."""
    c, workers = cluster
    cfg = toy_config(finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}})
    serial = SerialExecutor(num_shards=2, threads=1)
    run(cfg, tmp_path / "serial", serial, do_eval=False, progress=False)

    calls = []

    def lose_a_node_at_the_third_call(actors):
        calls.append(len(calls))
        if len(calls) == 3:
            c.remove_node(victim)

    ray_ex = RayExecutor(num_workers=2, actor_resources=STATS, start_timeout_s=120)
    ray_ex.fault_injection = lose_a_node_at_the_third_call
    ray_ex.start(cfg.model, cfg.data)
    by_node = {p["node_id"]: w for p in ray_ex.placement for w in workers if w.node_id == p["node_id"]}
    assert len(by_node) == 2
    victim = by_node[ray_ex.placement[1]["node_id"]]
    survivor = next(w for w in workers if w is not victim)
    try:
        run(cfg, tmp_path / "ray", ray_ex, do_eval=False, progress=False)
        assert ray_ex.restarts >= 1
        # the replacement runs on the surviving node and the result is the undisturbed one
        assert {ray.get(a.placement.remote(), timeout=60)["node_id"] for a in ray_ex.actors} == {survivor.node_id}
        assert (tmp_path / "ray" / "model.bgd").read_bytes() == (tmp_path / "serial" / "model.bgd").read_bytes()

        # now the last worker node goes too: no node can hold the actors, the error names it
        calls.clear()
        victim = survivor
        with pytest.raises(RuntimeError) as e:
            run(cfg, tmp_path / "ray2", ray_ex, do_eval=False, progress=False)
        message = str(e.value)
        assert survivor.node_id[:12] in message and "was lost" in message and "--resume" in message
    finally:
        ray_ex.close()
