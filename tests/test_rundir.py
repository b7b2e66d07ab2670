"""A run directory that can be trusted: plan under the fingerprint, one run at a time, an
exported file that loads, damaged checkpoints named and recomputed."""

import json
import subprocess
import sys
import time

import pytest

from bgd_dist import load_compressed
from bgd_dist.config import to_mapping
from bgd_dist.executor import SerialExecutor
from bgd_dist.runner import InjectedFailure, Run, RunDirectoryLocked, allocate, evaluate, run
from bgd_dist.student import student_state

from toy import toy_config

NO_GLOBAL = {"layerwise": {"iterations": 2, "batch_size": 8, "lr": 0.01}, "global": {"enabled": False}}


def quick(**sections):
    return toy_config(finetune=NO_GLOBAL, **sections)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run(quick(), out, progress=False, do_eval=False)
    return (out / "model.bgd").read_bytes()


def interrupted(tmp_path, stage=1):
    with pytest.raises(InjectedFailure):
        run(quick(), tmp_path, fail_after_stage=stage, progress=False, do_eval=False)
    return json.loads((tmp_path / "manifest.json").read_text())


def test_a_rule_change_after_the_plan_was_written_is_refused_naming_the_rule(tmp_path):
    # a run stopped after plan.json was written, before its first stage finished
    r = Run.open(quick(), tmp_path, resume=False, progress=False)
    allocate(r)
    assert (tmp_path / "plan.json").exists() and json.loads((tmp_path / "manifest.json").read_text())["plan"]
    rules = to_mapping(quick().quantize)["rules"]
    rules[1] = {**rules[1], "block_size": 2, "n_centroids": 16}      # fc: d=4 K=8 -> d=2 K=16
    changed = quick(quantize={**to_mapping(quick().quantize), "rules": rules})
    with pytest.raises(ValueError, match=r"config differ.*quantize\.rules\.1\.block_size: 4 -> 2"):
        run(changed, tmp_path, resume=True, progress=False, do_eval=False)


def test_a_plan_file_that_differs_from_the_recorded_one_is_recomputed(tmp_path, reference, caplog):
    interrupted(tmp_path, stage=0)
    plan = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps(plan) + " ")
    run(quick(), tmp_path, resume=True, progress=False, do_eval=False)
    assert "plan.json differs from the plan recorded" in caplog.text
    assert (tmp_path / "model.bgd").read_bytes() == reference


def test_a_second_run_into_the_same_directory_fails_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from bgd_dist.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(120)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with pytest.raises(RunDirectoryLocked, match=f"in use by another run \\(PID {holder.pid}\\)"):
            run(quick(), tmp_path, progress=False, do_eval=False)
        assert time.perf_counter() - start < 60      # refused, not waiting for the holder
        assert not (tmp_path / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    run(quick(), tmp_path, progress=False, do_eval=False)   # the lock died with its holder


def test_model_kwargs_the_factory_cannot_take_are_refused_before_any_work(tmp_path):
    cfg = toy_config(model={"adapter": "bgd_dist.testing:ToyAdapter", "arch": "toy", "kwargs": {"width": "8"}})
    with pytest.raises(ValueError, match="model.kwargs.*toy_convnet cannot build"):
        run(cfg, tmp_path, progress=False)
    cfg = toy_config(model={"adapter": "bgd_dist.testing:ToyAdapter", "arch": "toy", "kwargs": {"depth": 3}})
    with pytest.raises(ValueError, match="model.kwargs.*depth"):
        run(cfg, tmp_path, progress=False)
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "plan.json").exists()


def test_the_reported_metrics_are_those_of_the_exported_file(tmp_path):
    cfg = quick()
    report = run(cfg, tmp_path, progress=False)
    ex = SerialExecutor(num_shards=cfg.executor.num_workers)
    ex.start(cfg.model, cfg.data)
    ex.load_student(student_state(load_compressed(tmp_path / "model.bgd")))
    from bgd_dist.adapters import make_adapter

    assert report["metrics_after"] == evaluate(ex, make_adapter(cfg.model, cfg.data), "student",
                                               cfg.eval.max_images)
    records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["metrics"] for r in records if r["event"] == "eval" and r["model"] == "student"] == \
        [report["metrics_after"]]


def test_stage_files_are_recorded_with_their_checksums(tmp_path):
    manifest = interrupted(tmp_path)
    import hashlib

    for k in ("0", "1"):
        (rel, sha), = manifest["stages"][k]["files"].items()
        assert rel == f"stages/{k}/codebooks.pt"
        assert sha == hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()


def test_a_truncated_stage_file_is_named_and_recomputed(tmp_path, reference, caplog):
    interrupted(tmp_path)
    stage_file = tmp_path / "stages" / "0" / "codebooks.pt"
    stage_file.write_bytes(stage_file.read_bytes()[:100])
    run(quick(), tmp_path, resume=True, progress=False, do_eval=False)
    assert f"{stage_file} does not match its checksum" in caplog.text and "computing the stage again" in caplog.text
    assert (tmp_path / "model.bgd").read_bytes() == reference
    events = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in events if e["event"] == "stage_recomputed"] == [0]


def test_a_stage_file_of_another_run_is_not_replayed(tmp_path, tmp_path_factory, reference, caplog):
    interrupted(tmp_path)
    other = tmp_path_factory.mktemp("other")
    with pytest.raises(InjectedFailure):
        run(quick(quantize={**to_mapping(quick().quantize), "seed": 4}), other, fail_after_stage=1,
            progress=False, do_eval=False)
    swapped = other / "stages" / "1" / "codebooks.pt"
    (tmp_path / "stages" / "1" / "codebooks.pt").write_bytes(swapped.read_bytes())   # same layers, other values
    run(quick(), tmp_path, resume=True, progress=False, do_eval=False)
    assert "stages/1/codebooks.pt does not match its checksum" in caplog.text
    assert (tmp_path / "model.bgd").read_bytes() == reference


def test_a_truncated_manifest_is_named(tmp_path):
    interrupted(tmp_path, stage=0)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ValueError, match=f"{manifest}: damaged"):
        run(quick(), tmp_path, resume=True, progress=False, do_eval=False)
