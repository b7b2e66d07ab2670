"""The sequential driver with the in-process executor."""

import json

import pytest
import torch

from bgd_dist import load_compressed
from bgd_dist.adapters import make_adapter
from bgd_dist.config import to_mapping
from bgd_dist.executor import SerialExecutor
from bgd_dist.messages import CollectRequest, LayerRequest
from bgd_dist.nn.modules import pq_layers
from bgd_dist.plan import Plan
from bgd_dist.runner import InjectedFailure, load_stage, load_stage_stats, run
from bgd_dist.student import load_student, quantize_like, student_state

from toy import toy_config


def state_of(path):
    return load_compressed(path).state_dict()


def assert_same_model(a, b):
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    report = run(toy_config(), out, progress=False)
    return out, report


def test_run_writes_every_artifact(full_run):
    out, report = full_run
    for name in ("config.yaml", "plan.json", "manifest.json", "model.bgd", "log.jsonl", "report.json"):
        assert (out / name).is_file(), name
    plan = Plan.load(out / "plan.json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["stages"], key=int) == [str(i) for i in range(len(plan.stages))]
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    events = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    layer_events = [e for e in events if e["event"] == "layer"]
    assert [e["layer"] for e in layer_events] == [n for st in plan.stages for n in st]
    assert all(e["objective_end"] <= e["objective_start"] for e in layer_events)
    assert report["ratio"] > 1 and report["metrics_before"]["agreement"] == 1.0
    assert set(report["seconds"]) >= {"collect", "fit", "layerwise", "global", "export", "eval", "total"}
    model = load_compressed(out / "model.bgd")
    assert set(pq_layers(model)) == {l.name for l in plan.quantized}
    # the report says how fast the workers read calibration images and how big the run directory is
    for stage in report["stages"]:
        assert stage["collect_images_per_s_per_worker"] > 0 and 0 <= stage["collect_data_share"] < 1
        assert stage["stats_file_bytes"] == (out / "stages" / str(stage["stage"]) / "stats.pt").stat().st_size
    size = lambda paths: sum(p.stat().st_size for p in paths if p.is_file())
    assert size([out / "model.bgd", *(out / "stages").rglob("*")]) < report["run_dir_bytes"]
    assert report["run_dir_bytes"] <= size(out.rglob("*")) - size([out / "report.json"]) + size([out / "losses.png"])


def test_stage_statistics_come_from_the_previous_student(full_run):
    """Stage 1's statistics differ from the teacher's and equal those recomputed on the
    saved stage-0 student."""
    out, _ = full_run
    cfg = toy_config()
    plan = Plan.load(out / "plan.json")
    stage0, stage1 = list(plan.stages[0]), list(plan.stages[1])
    recorded = load_stage_stats(out / "stages" / "1" / "stats.pt")
    layers = [LayerRequest(n, plan.layer(n).geometry, plan.layer(n).block_size, "gram") for n in stage1]

    ex = SerialExecutor(num_shards=cfg.executor.num_workers)
    ex.start(cfg.model, cfg.data)
    teacher = ex.worker.teacher
    q = cfg.quantize
    ex.load_student(student_state(teacher))
    from_teacher = ex.collect(CollectRequest(layers, q.n_calibration, q.batch_size, q.seed * 1000 + 1)).stats
    # the stage-0 student as checkpointed (its centroids are fine-tuned)
    student = quantize_like(load_student(teacher, student_state(teacher)), stage0,
                            load_stage(out / "stages" / "0" / "codebooks.pt", stage0))
    ex.load_student(student_state(student))
    from_student = ex.collect(CollectRequest(layers, q.n_calibration, q.batch_size, q.seed * 1000 + 1)).stats
    for n in stage1:
        torch.testing.assert_close(recorded[n].gram, from_student[n].gram, rtol=1e-12, atol=0)
        assert not torch.allclose(recorded[n].gram, from_teacher[n].gram, rtol=1e-6, atol=0)


def test_interrupt_and_resume_gives_the_same_file(full_run, tmp_path):
    out, _ = full_run
    cfg = toy_config()
    with pytest.raises(InjectedFailure):
        run(cfg, tmp_path, fail_after_stage=1, progress=False, do_eval=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["stages"]) == ["0", "1"]
    assert not (tmp_path / "model.bgd").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg, tmp_path, progress=False, do_eval=False)
    run(cfg, tmp_path, resume=True, progress=False, do_eval=False)
    assert_same_model(tmp_path / "model.bgd", out / "model.bgd")


def test_resume_refuses_a_different_run(full_run, tmp_path):
    cfg = toy_config()
    with pytest.raises(InjectedFailure):
        run(cfg, tmp_path, fail_after_stage=0, progress=False, do_eval=False)
    other = toy_config(quantize={**to_mapping(cfg.quantize), "n_iter": 9})
    with pytest.raises(ValueError, match="cannot resume: the config differ"):
        run(other, tmp_path, resume=True, progress=False, do_eval=False)
    other_model = toy_config(model={**toy_config().model.__dict__, "kwargs": {"width": 8, "seed": 1}})
    with pytest.raises(ValueError, match="cannot resume: the model"):
        run(other_model, tmp_path, resume=True, progress=False, do_eval=False)


def test_a_failing_fit_names_the_layer_and_keeps_finished_stages(tmp_path):
    # poison conv3's weight: stage 0 (conv2) finishes, the fit of conv3 fails
    cfg = toy_config(model={"adapter": "bgd_dist.testing:ToyAdapter", "arch": "toy",
                            "kwargs": {"width": 8, "poison": "conv3"}},
                     finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}})
    with pytest.raises(RuntimeError, match="codebook fit failed for layer 'conv3'.*NaN"):
        run(cfg, tmp_path, progress=False, do_eval=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["0"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_comparison_flags_weights_only_and_no_finetuning(tmp_path):
    cfg = toy_config(quantize={"objective": "weights"},
                     finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}})
    report = run(cfg, tmp_path, progress=False, do_eval=False)
    assert not (tmp_path / "stages" / "0" / "stats.pt").exists()      # no statistics needed
    assert all(s["loss_start"] is None for s in report["stages"])       # no layer-wise distillation
    assert report["seconds"]["layerwise"] == 0 and report["seconds"]["global"] == 0


def test_layerwise_distillation_trains_only_the_stage_centroids():
    from bgd_dist.finetune import PhaseSpec, distill
    from bgd_dist.core.kmeans import fit_codebook
    from bgd_dist.nn.modules import quantized_from_dense
    from bgd_dist.core.layouts import geometry_of

    cfg = toy_config()
    adapter = make_adapter(cfg.model, cfg.data)
    teacher = adapter.build_model()
    student = load_student(teacher, student_state(teacher))
    for name in ("conv2", "conv3"):
        m = student.get_submodule(name)
        cb = fit_codebook(m.weight.detach(), geometry_of(m), None, 16, 9, 3, seed=0)
        setattr(student, name, quantized_from_dense(m, cb, name))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    spec = PhaseSpec("layerwise", 3, 0.1, 0.9, 1e-4, 8, layers=("conv3",))
    losses = distill(student, teacher, adapter, spec, adapter.train_batches(0, 1, 8, 0)).losses
    after = student.state_dict()
    assert len(losses) == 3
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"conv3.centroids"}         # BN statistics frozen, other layers untouched
    assert not student.training
