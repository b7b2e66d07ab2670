"""Ray (2 workers) against the serial executor on a tiny Mask R-CNN: same statistics, same codebooks."""

import pytest
import ray
import torch

from bgd_dist.adapters import make_adapter, plan_for
from bgd_dist.distributed.ray_executor import RayExecutor
from bgd_dist.executor import SerialExecutor
from bgd_dist.nn.modules import get_submodule
from bgd_dist.student import student_state
from bgd_dist.messages import CollectRequest, FitJob, FitSettings, LayerRequest
from detection.shapes import make_shapes
from detection.testing import tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = make_shapes(tmp_path_factory.mktemp("shapes"), n_train=12, n_val=4, size=64, seed=0)
    cfg = tiny_config(data)
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model()
    return cfg, teacher, plan_for(cfg, teacher, adapter)


@pytest.fixture(scope="module")
def executors(ray_cluster, setup):
    cfg = setup[0]
    threads = torch.get_num_threads()
    # one thread, as in each Ray actor: a reduction split over threads may round differently
    ray_ex, serial = RayExecutor(num_workers=2), SerialExecutor(num_shards=2, threads=1)
    try:
        for ex in (ray_ex, serial):
            ex.start(cfg.model, cfg.data)
        yield ray_ex, serial
    finally:
        ray_ex.close()
        serial.close()
        torch.set_num_threads(threads)


def test_ray_and_serial_give_the_same_statistics_and_codebooks(setup, executors):
    cfg, teacher, plan = setup
    payload = student_state(teacher)
    last = len(plan.stages) - 1
    fc6 = plan.layer("roi_heads.box_head.fc6").stage
    for s in (0, 2, fc6, last):   # backbone (stage 2: a conv, its downsample and an FPN lateral), box head, mask
        layers = [LayerRequest(n, plan.layer(n).geometry, plan.layer(n).block_size, "gram") for n in plan.stages[s]]
        results = []
        for ex in executors:
            ex.load_student(payload)
            stats = ex.collect(CollectRequest(layers, 8, 2, seed=5)).stats
            jobs = [FitJob(n, get_submodule(teacher, n).weight.detach(), plan.layer(n).geometry, stats[n].metric(),
                           plan.layer(n).n_centroids, plan.layer(n).block_size, 0,
                           settings=FitSettings(6, "random"))
                    for n in plan.stages[s]]
            results.append((stats, ex.fit(jobs)))
        (st_r, cb_r), (st_s, cb_s) = results
        for n in plan.stages[s]:
            assert st_r[n].gram.dtype == torch.float64
            assert st_r[n].n_rows == st_s[n].n_rows > 0
            torch.testing.assert_close(st_r[n].gram, st_s[n].gram, rtol=1e-9, atol=0)
            assert torch.equal(cb_r[n].codebook.assignments, cb_s[n].codebook.assignments), n
            torch.testing.assert_close(cb_r[n].codebook.centroids, cb_s[n].codebook.centroids, rtol=1e-6, atol=1e-7)
