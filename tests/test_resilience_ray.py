"""Under Ray, an actor killed with SIGKILL mid-phase is replaced and the run finishes by itself,
with the bytes of an undisturbed run; a SIGKILLed driver resumes to the same bytes."""

import json
import os
import signal

import pytest
import ray

from bgd_dist.config import load_pipeline
from bgd_dist.distributed.ray_executor import RayExecutor
from bgd_dist.runner import run

from test_resilience import EVERY, quantize, write_config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A fresh local cluster (``address="local"``: never one another process on the machine
    started) and an undisturbed run of the Ray pipeline on it."""
    tmp = tmp_path_factory.mktemp("ray_ref")
    path = write_config(tmp / "toy.yaml", kind="ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayExecutor(num_workers=2) as ex:
            run(load_pipeline(path), tmp / "run", ex, do_eval=False, progress=False)
        yield path, (tmp / "run" / "model.bgd").read_bytes()
    finally:
        ray.shutdown()


def killer(phase: str, at_step: int, actor: int = 1):
    """A fault hook: SIGKILL actor ``actor``'s process once, when rank 0 reports ``at_step`` of ``phase``."""
    done = []

    def hook(name, step, actors):
        if not done and name == phase and step >= at_step:
            pid = ray.get(actors[actor].pid.remote())
            os.kill(pid, signal.SIGKILL)
            done.append(pid)

    hook.done = done
    return hook


@pytest.mark.slow
@pytest.mark.parametrize("phase,how", [("layerwise", "self"), ("global", "driver")])
def test_a_killed_actor_is_replaced_mid_phase_and_the_bytes_do_not_change(reference, tmp_path, phase, how):
    path, expected = reference
    out = tmp_path / "run"
    with RayExecutor(num_workers=2) as ex:
        if how == "self":      # deterministic: actor 1 SIGKILLs itself after step 6 (of stage 0)
            ex.kill_actor_at = (phase, 6, 1)
        else:                  # the driver SIGKILLs actor 1's PID once it sees step 5 (it may land later)
            ex.distill_fault = hook = killer(phase, 5)
        run(load_pipeline(path), out, ex, do_eval=False, progress=False)
        assert ex.kill_actor_at is None and (how == "self" or hook.done), "the kill did not happen"
        assert ex.restarts == 1
    assert (out / "model.bgd").read_bytes() == expected
    events = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    restarts = [e for e in events if e["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["phase"] == phase and restarts[0]["actors"] == [1]
    if how == "self":
        assert restarts[0]["from_step"] == 4 and 0 < restarts[0]["steps_redone"] <= 2
    assert 0 <= restarts[0]["steps_redone"] <= EVERY


@pytest.mark.slow
def test_ray_driver_sigkilled_in_the_global_phase_resumes_to_the_same_bytes(reference, tmp_path):
    path, expected = reference
    r = quantize(path, tmp_path / "b", kill_at="global:4")
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = quantize(path, tmp_path / "b", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from the checkpoint at step 4/10" in r.stderr
    assert (tmp_path / "b" / "model.bgd").read_bytes() == expected
