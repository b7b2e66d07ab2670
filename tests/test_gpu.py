"""On a CUDA device: the same results as on the CPU (within float tolerance), and the Ray executor
with two actors sharing one GPU (fractional ``num_gpus_per_worker``; its distillation group falls
back from NCCL to gloo and logs it). Skipped where torch sees no CUDA device
(``benchmarks/device_check.sh`` runs them on a GPU machine)."""

import copy
import logging

import pytest
import torch

from bgd_dist.core.kmeans import fit_codebook
from bgd_dist.core.stats import make_stats
from bgd_dist.executor import SerialExecutor
from bgd_dist.finetune import PhaseSpec
from bgd_dist.nn.modules import get_submodule, quantize_
from bgd_dist.student import student_state

from toy import toy_setup

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def setup():
    cfg, adapter, teacher, plan = toy_setup()
    return cfg, adapter, teacher, plan


def _codebooks(plan, model, n_iter=6, device="cpu"):
    out = {}
    for stage in plan.stages:
        for n in stage:
            w = get_submodule(model, n).weight.detach().to(device)
            out[n] = fit_codebook(w, plan.layer(n).geometry, None, plan.layer(n).n_centroids,
                                  plan.layer(n).block_size, n_iter, seed=1)
    return out


def test_pq_modules_on_cuda_compute_what_they_compute_on_the_cpu(setup):
    cfg, adapter, teacher, plan = setup
    student = quantize_(copy.deepcopy(teacher), plan, _codebooks(plan, teacher))
    x = next(adapter.calibration_batches(0, 1, 8, 8, seed=0))
    with torch.no_grad():
        cpu = student(x)
        cuda = copy.deepcopy(student).cuda()(x.cuda()).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)


def test_statistics_and_kmeans_on_cuda_equal_the_cpu(setup):
    cfg, adapter, teacher, plan = setup
    name = plan.stages[1][0]
    layer = plan.layer(name)
    module = get_submodule(teacher, name)
    captured = []
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        for batch in adapter.calibration_batches(0, 1, 32, 8, seed=0):
            teacher(batch)
    handle.remove()
    on = {}
    for device in ("cpu", "cuda"):
        stats = make_stats("gram", layer.geometry, layer.block_size, name)
        for x in captured:
            stats.update(x.to(device))
        on[device] = stats
    torch.testing.assert_close(on["cuda"].gram.cpu(), on["cpu"].gram, rtol=1e-9, atol=1e-9)
    metric = on["cpu"].metric()
    w = module.weight.detach()
    cpu = fit_codebook(w, layer.geometry, metric, layer.n_centroids, layer.block_size, 10, seed=2)
    cuda = fit_codebook(w.cuda(), layer.geometry, metric.cuda(), layer.n_centroids, layer.block_size, 10, seed=2)
    agree = (cuda.assignments.cpu() == cpu.assignments).float().mean().item()
    assert agree >= 0.99, agree
    assert abs(cuda.objective[-1] - cpu.objective[-1]) <= 1e-4 * max(1.0, abs(cpu.objective[-1]))


def test_ray_actors_sharing_the_gpu_use_gloo_and_match_the_cpu(setup, caplog):
    import ray

    from bgd_dist.distributed.ray_executor import RayExecutor

    cfg, adapter, teacher, plan = setup
    student = quantize_(copy.deepcopy(teacher), plan, _codebooks(plan, teacher, n_iter=4))
    payload = student_state(student)
    layers = [(n, plan.layer(n).geometry, plan.layer(n).block_size, "gram") for n in plan.stages[0]]
    spec = PhaseSpec("layerwise", 4, 0.05, 0.9, 1e-4, 8, layers=tuple(plan.stages[1]), seed=11)

    cpu = SerialExecutor(num_shards=2, device="cpu", threads=1)
    cpu.start(cfg.model, cfg.data)
    cpu.load_student(payload)
    expected_stats = cpu.collect(layers, 32, 8, seed=5)
    one = SerialExecutor(num_shards=1, device="cpu", threads=1)
    one.start(cfg.model, cfg.data)
    one.load_student(payload)
    expected = one.distill(spec)

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    ex = RayExecutor(num_workers=2, num_gpus_per_worker=0.5, start_timeout_s=300)
    try:
        with caplog.at_level(logging.WARNING, logger="bgd_dist.distributed.ray_executor"):
            ex.start(cfg.model, cfg.data)
        assert ex.group_backend == "gloo" and "NCCL refuses two ranks on one device" in caplog.text
        assert all(p["gpu_ids"] for p in ex.placement)
        ex.load_student(payload)
        stats = ex.collect(layers, 32, 8, seed=5)
        for n in stats:
            torch.testing.assert_close(stats[n].gram.cpu(), expected_stats[n].gram, rtol=1e-6, atol=1e-6)
        parallel = ex.distill(spec)
        for n, centroids in expected["centroids"].items():
            torch.testing.assert_close(parallel["centroids"][n], centroids, rtol=1e-3, atol=1e-4)
    finally:
        ex.close()
        ray.shutdown()
