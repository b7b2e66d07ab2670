"""The Ray executor against the in-process one: same statistics, codebooks and distillation."""

import copy

import pytest
import ray
import torch

from bgd_dist.core.kmeans import fit_codebook
from bgd_dist.distributed.ray_executor import RayExecutor
from bgd_dist.executor import SerialExecutor
from bgd_dist.finetune import PhaseSpec
from bgd_dist.nn.modules import get_submodule, quantize_
from bgd_dist.runner import run
from bgd_dist.student import student_state
from bgd_dist.messages import CollectRequest, FitJob, FitSettings, LayerRequest

from toy import toy_config, toy_setup

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    cfg, adapter, teacher, plan = toy_setup()
    return cfg, adapter, teacher, plan


def stage_layers(plan, s):
    return [LayerRequest(n, plan.layer(n).geometry, plan.layer(n).block_size, "gram") for n in plan.stages[s]]


def fit_jobs(plan, model, stats, s, seed=0):
    return [FitJob(n, get_submodule(model, n).weight.detach(), plan.layer(n).geometry, stats[n].metric(),
                   plan.layer(n).n_centroids, plan.layer(n).block_size, seed, settings=FitSettings(6, "random"))
            for n in plan.stages[s]]


@pytest.fixture(scope="module")
def executors(ray_cluster, setup):
    cfg = setup[0]
    ray_ex, serial = RayExecutor(num_workers=2), SerialExecutor(num_shards=2)
    for ex in (ray_ex, serial):
        ex.start(cfg.model, cfg.data)
    yield ray_ex, serial
    ray_ex.close()
    serial.close()


def test_ray_and_serial_give_the_same_statistics_and_codebooks(setup, executors):
    cfg, adapter, teacher, plan = setup
    ray_ex, serial = executors
    payload = student_state(teacher)
    for s in (0, 1):   # stage 1 holds two layers reading the same input
        results = []
        for ex in (ray_ex, serial):
            ex.load_student(payload)
            stats = ex.collect(CollectRequest(stage_layers(plan, s), 32, 8, seed=5)).stats
            results.append((stats, ex.fit(fit_jobs(plan, teacher, stats, s))))
        (st_r, cb_r), (st_s, cb_s) = results
        for n in plan.stages[s]:
            assert st_r[n].gram.dtype == torch.float64
            torch.testing.assert_close(st_r[n].gram, st_s[n].gram, rtol=1e-9, atol=0)
            assert st_r[n].n_rows == st_s[n].n_rows > 0
            assert torch.equal(cb_r[n].codebook.assignments, cb_s[n].codebook.assignments)
            torch.testing.assert_close(cb_r[n].codebook.centroids, cb_s[n].codebook.centroids, rtol=1e-6, atol=1e-7)


def test_a_killed_stats_actor_is_replaced_and_its_shard_counted_once(setup, executors):
    cfg, adapter, teacher, plan = setup
    ray_ex, serial = executors
    payload = student_state(teacher)
    serial.load_student(payload)
    undisturbed = serial.collect(CollectRequest(stage_layers(plan, 0), 32, 8, seed=5)).stats
    ray_ex.load_student(payload)
    restarts = ray_ex.restarts
    ray_ex.fault_injection = lambda actors: ray.kill(actors[0], no_restart=True)
    try:
        disturbed = ray_ex.collect(CollectRequest(stage_layers(plan, 0), 32, 8, seed=5)).stats
    finally:
        ray_ex.fault_injection = None
    assert ray_ex.restarts == restarts + 1
    for n in plan.stages[0]:
        torch.testing.assert_close(disturbed[n].gram, undisturbed[n].gram, rtol=1e-12, atol=0)
        assert disturbed[n].n_rows == undisturbed[n].n_rows


def test_data_parallel_distillation_equals_one_worker_with_the_global_batch(setup, executors):
    cfg, adapter, teacher, plan = setup
    ray_ex, _ = executors
    student = copy.deepcopy(teacher)
    codebooks = {}
    for s in (0, 1):
        for n in plan.stages[s]:
            m = get_submodule(student, n)
            codebooks[n] = fit_codebook(m.weight.detach(), plan.layer(n).geometry, None,
                                        plan.layer(n).n_centroids, plan.layer(n).block_size, 4)
    quantize_(student, plan, codebooks)
    payload = student_state(student)
    spec = PhaseSpec("layerwise", 4, 0.05, 0.9, 1e-4, 8, layers=tuple(plan.stages[1]), seed=11)
    one = SerialExecutor(num_shards=1)
    one.start(cfg.model, cfg.data)
    one.load_student(payload)
    single = one.distill(spec)
    ray_ex.load_student(payload)
    parallel = ray_ex.distill(spec)
    assert len(parallel.losses) == 4
    for n in plan.stages[1]:
        assert not torch.equal(single.centroids[n], payload["state"][f"{n}.centroids"])  # it trained
        torch.testing.assert_close(parallel.centroids[n], single.centroids[n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(parallel.losses), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)


def test_a_failing_fit_task_names_the_layer(setup, executors):
    cfg, adapter, teacher, plan = setup
    ray_ex, _ = executors
    n = plan.stages[0][0]
    w = get_submodule(teacher, n).weight.detach().clone()
    w.view(-1)[3] = float("inf")
    job = FitJob(n, w, plan.layer(n).geometry, None, 8, plan.layer(n).block_size, 0, settings=FitSettings(3, "random"))
    with pytest.raises(RuntimeError, match=f"codebook fit failed for layer '{n}'.*NaN or inf"):
        ray_ex.fit([job])


def test_full_run_on_ray(ray_cluster, tmp_path):
    report = run(toy_config(executor={"kind": "ray", "num_workers": 2}), tmp_path, progress=False)
    assert (tmp_path / "model.bgd").is_file()
    assert report["metrics_after"]["n_images"] == report["metrics_before"]["n_images"] == 32
    assert report["metrics_after"]["agreement"] >= 0.75
    assert all(s["bytes_shipped"] > 0 for s in report["stages"])


def test_ray_and_serial_agree_on_hessian_statistics_and_fits(setup, executors):
    cfg, adapter, teacher, plan = setup
    ray_ex, serial = executors
    names = [l.name for l in plan.quantized if l.geometry.groups == 1 and l.geometry.kind != "linear"]
    assert len(names) >= 2             # conv2 and the 1x1 shortcut (conv3 is grouped: no full statistics)
    layers = [LayerRequest(n, plan.layer(n).geometry, plan.layer(n).block_size, "hessian") for n in names]
    results = []
    for ex in (ray_ex, serial):
        ex.load_student(student_state(teacher))
        stats = ex.collect(CollectRequest(layers, 32, 8, seed=5)).stats
        jobs = [FitJob(n, get_submodule(teacher, n).weight.detach(), plan.layer(n).geometry, stats[n].metric(),
                       plan.layer(n).n_centroids, plan.layer(n).block_size, 0, objective="hessian",
                       settings=FitSettings(4, "random", hessian_rounds=2, hessian_cg_steps=5)) for n in names]
        results.append((stats, ex.fit(jobs)))
    (st_r, cb_r), (st_s, cb_s) = results
    for n in names:
        length = plan.layer(n).geometry.row_length
        assert st_r[n].hessian.shape == (length, length)
        torch.testing.assert_close(st_r[n].hessian, st_s[n].hessian, rtol=1e-9, atol=0)
        assert st_r[n].n_inputs == st_s[n].n_inputs > 0
        assert torch.equal(cb_r[n].codebook.assignments, cb_s[n].codebook.assignments)
        torch.testing.assert_close(cb_r[n].codebook.centroids, cb_s[n].codebook.centroids, rtol=1e-6, atol=1e-7)
