"""The cluster as users meet it: ``ray start --head`` then ``ray job submit`` of ``bgd quantize``, with
the README's command; and ``--address`` pointing at no cluster fails fast, on one line, exit code 1.

The cluster runs from this interpreter's environment (``bgd`` is installed there); ``--working-dir .``
uploads this checkout, which Ray puts first on the job's ``PYTHONPATH``. It gets free ports and its
own temporary directory, and only its own processes are stopped (its process group, then any process
still naming its temporary directory), never ``ray stop``.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# the README's command (README "Scaling out"); the test fills the placeholders and adds short settings
SUBMIT = ("ray job submit --address http://{head}:{dashboard} --working-dir . -- "
          "bgd quantize pipelines/digits.yaml --address auto --out {out} --set data.cache_dir={cache}")
README_VALUES = {"head": "<head-ip>", "dashboard": "8265", "out": "/shared/runs/digits", "cache": "/shared/cache"}
SHORT = ["quantize.n_iter=8", "quantize.n_calibration=256", "finetune.layerwise.iterations=4",
         "finetune.global.epochs=1", "finetune.global.iterations_per_epoch=4", "data.teacher_epochs=2",
         "eval.max_images=200"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    # a private cluster on 127.0.0.1: no token authentication (a real cluster keeps its own setting)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled")
    for key in ("RAY_ADDRESS", "PYTHONPATH"):
        env.pop(key, None)
    return env


def bgd(*argv, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "bgd_dist.cli", *argv], cwd=ROOT, env=env or environment(),
                          capture_output=True, text=True, timeout=timeout)


def _our_processes(temp: str, gcs_port: int) -> list[int]:
    """Processes of the test cluster: those naming its temp dir, and job drivers (their own session)
    whose RAY_ADDRESS is this cluster's."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if temp.encode() in (entry / "cmdline").read_bytes() or any(
                        v.startswith(b"RAY_ADDRESS=") and v.endswith(f":{gcs_port}".encode())
                        for v in (entry / "environ").read_bytes().split(b"\0")):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def head():
    """``ray start --head --block`` in its own process group, on free ports, with a short temp dir."""
    temp = tempfile.mkdtemp(prefix="bgdray", dir="/tmp")   # Unix socket paths must stay short
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
           f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           "--node-ip-address=127.0.0.1", "--min-worker-port=0", "--max-worker-port=0",
           *[f"--{name}={port}" for name, port in ports.items()]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environment(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"   # for the client in this process
    try:
        from ray.job_submission import JobSubmissionClient

        deadline, client = time.monotonic() + 180, None
        while client is None:
            try:
                client = JobSubmissionClient(dashboard)
                client.list_jobs()
            except Exception:
                client = None
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the test cluster did not start (ray start exit {proc.poll()})")
                time.sleep(2)
        yield {"dashboard": dashboard, "port": ports["dashboard-port"], "gcs": f"127.0.0.1:{ports['port']}",
               "client": client}
    finally:
        try:   # a job still running (an interrupted test) is stopped first
            from ray.job_submission import JobStatus, JobSubmissionClient

            client = JobSubmissionClient(dashboard)
            for job in client.list_jobs():
                if job.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                    client.stop_job(job.submission_id)
        except Exception:
            pass
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in [proc.pid, *_our_processes(temp, ports["port"])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode


def test_the_readme_shows_the_submit_command_this_test_runs():
    text = (ROOT / "README.md").read_text()
    flat = re.sub(r"\s*\\\n\s*", " ", text)
    assert SUBMIT.format(**README_VALUES) in flat


@pytest.mark.slow
def test_ray_job_submit_of_bgd_quantize_succeeds_and_writes_the_report(head, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = SUBMIT.format(head="127.0.0.1", dashboard=head["port"], out=out, cache=cache).split()
    argv[0] = str(BIN / "ray")
    for s in SHORT:
        argv += ["--set", s]
    argv += ["--no-progress"]
    done = subprocess.run(argv, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
    jobs = head["client"].list_jobs()
    assert len(jobs) == 1, (done.stdout[-3000:], done.stderr[-3000:])
    job = jobs[0].submission_id
    logs = head["client"].get_job_logs(job)
    assert str(head["client"].get_job_status(job)).endswith("SUCCEEDED"), (done.stderr[-3000:], logs[-3000:])
    assert done.returncode == 0 and f"Job '{job}' succeeded" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert (out / "model.bgd").is_file() and report["ratio"] > 5
    assert report["metrics_after"]["top1"] > 0.5
    assert "wrote" in logs and str(out) in logs


def test_no_cluster_at_the_address_is_one_line_and_exit_code_1():
    port = free_port()   # nothing listens there
    for address, env in ((f"127.0.0.1:{port}", environment()),
                         ("auto", {**environment(), "RAY_ADDRESS": f"127.0.0.1:{port}"})):   # a dead cluster
        start = time.monotonic()
        done = bgd("eval", "pipelines/digits.yaml", "--address", address, env=env)
        assert time.monotonic() - start < 30
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith("bgd eval: error: --address") and f":{port} " in lines[0]


def test_usage_and_configuration_errors_keep_exit_code_2(tmp_path):
    assert bgd("quantize", "pipelines/digits.yaml", "--set", "executor.num_workers=0").returncode == 2
    assert bgd("quantize", str(tmp_path / "missing.yaml")).returncode == 2
    assert bgd("quantize").returncode == 2   # argparse: the pipeline is required
