"""A run killed with SIGKILL mid-phase resumes to the same bytes; a run directory tells where it is.

The kills are real: ``BGD_TEST_KILL_AT`` makes the ``bgd quantize`` subprocess SIGKILL itself
right after a distillation checkpoint (see bgd_dist/phases.py).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bgd_dist.runlock import RunLock
from bgd_dist.status import format_status, run_status

from toy import BASE

ROOT = Path(__file__).resolve().parents[1]
EVERY = 4


def write_config(path: Path, kind: str = "serial") -> Path:
    raw = json.loads(json.dumps(BASE))
    raw["finetune"] = {"layerwise": {"iterations": 10, "batch_size": 8, "lr": 0.01},
                       "global": {"epochs": 2, "iterations_per_epoch": 5, "batch_size": 8, "lr_step_epochs": 1,
                                  "lr": 0.01},
                       "checkpoint_every": EVERY}
    raw["executor"] = {"kind": kind, "num_workers": 2}
    path.write_text(yaml.safe_dump(raw))
    return path


def quantize(cfg: Path, out: Path, *extra, kill_at: str | None = None, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("BGD_TEST_KILL_AT", None)
    env["RAY_ADDRESS"] = "local"   # a cluster of its own, whatever else runs on the machine
    if kill_at:
        env["BGD_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "bgd_dist.cli", "quantize", str(cfg), "--out", str(out),
                           "--no-eval", *extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          **kw)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    cfg = write_config(tmp / "toy.yaml")
    r = quantize(cfg, tmp / "run")
    assert r.returncode == 0, r.stderr
    return cfg, tmp / "run", r


def test_a_redirected_log_has_no_cursor_movement(straight):
    _, out, r = straight
    assert "\x1b[A" not in r.stderr and "\x1b[A" not in r.stdout
    assert "global distillation" in r.stderr        # the log lines are there


def test_every_phase_logs_its_loss_and_the_run_draws_it(straight):
    _, out, _ = straight
    events = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    losses = [(e["phase"], e["stage"], e["step"]) for e in events if e["event"] == "loss"]
    n_stages = len(json.loads((out / "plan.json").read_text())["stages"])
    for s in range(n_stages):
        assert [st for p, sg, st in losses if p == "layerwise" and sg == s] == [4, 8, 10]
    assert [st for p, _, st in losses if p == "global"] == [4, 8, 10]
    png = (out / "losses.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_status_of_a_finished_run(straight):
    _, out, _ = straight
    st = run_status(out)
    assert st["state"] == "finished" and st["stages_done"] == st["n_stages"] > 1
    assert st["restarts"] == 0 and st["size_mb_so_far"] > 0
    assert "finished" in format_status(st)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,phase,stage", [("global:4", "global", None), ("layerwise:1:4", "layerwise", 2)])
def test_sigkill_mid_phase_then_resume_gives_the_same_bytes(straight, tmp_path, kill_at, phase, stage):
    cfg, reference, _ = straight
    out = tmp_path / "run"
    r = quantize(cfg, out, kill_at=kill_at)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (out / "model.bgd").exists()
    st = run_status(out)                                   # where the killed run stopped, from its files
    assert (st["state"], st["phase"], st["step"], st["total"], st["stage"]) == ("stopped", phase, 4, 10,
                                                                               stage if stage else st["n_stages"])
    assert st["loss"] > 0 and "--resume" in format_status(st)
    with RunLock(out):                                     # a live run holds the directory
        live = run_status(out)
        assert (live["state"], live["pid"]) == ("in progress", str(os.getpid()))
    status = subprocess.run([sys.executable, "-m", "bgd_dist.cli", "status", str(out), "--json"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert json.loads(status.stdout)["step"] == 4
    r = quantize(cfg, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from the checkpoint at step 4/10" in r.stderr
    assert (out / "model.bgd").read_bytes() == (reference / "model.bgd").read_bytes()
    events = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "phase_start" and e["phase"] == phase and e["start_step"] == 4]
    assert len(starts) == 1
