"""The real-data check: scikit-learn's digits, a trained ResNet, the full pipeline on Ray.

One teacher is trained per session (seeded, cached in a temporary directory);
the full pipeline (Ray executor, 2 workers, layer-wise + global distillation)
compresses it at >= 15x by the paper's accounting and keeps its held-out top-1
within 3 points; the activation-aware objective reconstructs layer outputs
better than the weights-only one; the compressed file predicts exactly what the
in-memory student predicts; `bgd eval` scores teacher and file.
"""

import copy
import json
from pathlib import Path

import pytest
import ray
import torch

from bgd_dist import load_compressed
from bgd_dist.adapters import build_architecture, make_adapter, plan_for
from bgd_dist.cli import main
from bgd_dist.config import ModelConfig, load_pipeline
from bgd_dist.core.sizing import size_report
from bgd_dist.distributed.ray_executor import RayExecutor
from bgd_dist.nn.modules import pq_layers
from bgd_dist.runner import run
from bgd_dist.student import load_student
from classification.diagnostics import layer_output_errors, relative_output_error
from classification.digits import (DigitsAdapter, TeacherRecipe, crop_boxes, digit_arrays, heldout_accuracy,
                                   render, split_indices, teacher_path)

pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "digits.yaml"
# short fine-tuning for the test; the benchmark runs the pipeline as written
QUICK = ["finetune.layerwise.iterations=40", "finetune.global.epochs=1", "finetune.global.iterations_per_epoch=150"]
NO_FINETUNE = ["finetune.layerwise.enabled=false", "finetune.global.enabled=false"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


def pipeline(cache_dir, *overrides):
    return load_pipeline(PIPELINE, [f"data.cache_dir={cache_dir}", *overrides])


@pytest.fixture(scope="module")
def teacher(cache_dir):
    cfg = pipeline(cache_dir)
    return make_adapter(cfg.model, cfg.data).build_model()


@pytest.fixture(scope="module")
def adapter(cache_dir):
    cfg = pipeline(cache_dir)
    return make_adapter(cfg.model, cfg.data)


# -- data and teacher -------------------------------------------------------------------------------
def test_the_split_is_fixed_and_disjoint():
    images, labels = digit_arrays()
    assert images.shape == (1797, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 1
    train, held = split_indices()
    assert len(train) == 1397 and len(held) == 400
    assert sorted(torch.cat([train, held]).tolist()) == list(range(1797))
    assert torch.equal(split_indices()[1], held)
    assert set(labels[held].tolist()) == set(range(10))


def test_rendering_and_crops():
    images, _ = digit_arrays()
    full = render(images[:3], 16)
    assert full.shape == (3, 1, 16, 16)
    upsampled = torch.nn.functional.interpolate(images[:3, None], size=16, mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, (upsampled - 0.5) / 0.5, rtol=0, atol=1e-5)
    theta = crop_boxes(list(range(200)), (0.6, 1.0))
    w, h = theta[:, 0, 0], theta[:, 1, 1]
    assert bool(((w * h >= 0.6 - 1e-6) | (w == 1) | (h == 1)).all()) and bool((w <= 1).all() & (h <= 1).all())
    assert bool((theta[:, 0, 2].abs() <= 1 - w + 1e-6).all())      # the box stays inside the image
    assert torch.equal(crop_boxes([7, 8], (0.6, 1.0)), theta[7:9])


def test_calibration_on_photographs(cache_dir):
    """``data.calibration: photos``: calibration images are crops of natural photographs, a function of
    each item's seed (the same whatever the number of shards), shaped and scaled like the digits."""
    from bgd_dist.photos import photo_crop

    photos = make_adapter(*_model_data(pipeline(cache_dir, "data.calibration=photos")))
    digits = make_adapter(*_model_data(pipeline(cache_dir)))
    one = torch.cat(list(photos.calibration_batches(0, 1, 12, 5, seed=3)))
    two = [list(photos.calibration_batches(i, 2, 12, 5, seed=3)) for i in range(2)]
    assert one.shape == (12, 1, 16, 16) and float(one.min()) >= -1 and float(one.max()) <= 1
    assert torch.equal(one[0::2], torch.cat(two[0])) and torch.equal(one[1::2], torch.cat(two[1]))
    assert not torch.equal(one, torch.cat(list(digits.calibration_batches(0, 1, 12, 5, seed=3))))
    crop = photo_crop(5, 30, 40)
    assert crop.shape == (3, 30, 40) and torch.equal(crop, photo_crop(5, 30, 40)) and 0 <= float(crop.min())
    assert not torch.equal(crop, photo_crop(6, 30, 40))
    with pytest.raises(ValueError, match="calibration: expected one of"):
        make_adapter(*_model_data(pipeline(cache_dir, "data.calibration=imagenet")))


def _model_data(cfg):
    return cfg.model, cfg.data


def test_shards_and_batches(adapter):
    shards = [list(adapter.calibration_batches(i, 2, 100, 32, seed=4)) for i in range(2)]
    assert [b.shape[0] for b in shards[0]] == [32, 18] and shards[0][0].shape[1:] == (1, 16, 16)
    again = list(adapter.calibration_batches(1, 2, 100, 32, seed=4))
    assert all(torch.equal(a, b) for a, b in zip(again, shards[1]))
    one = adapter.train_batches(0, 1, 16, seed=2)
    two = [adapter.train_batches(i, 2, 8, seed=2) for i in range(2)]
    for _ in range(2):
        assert torch.equal(next(one), torch.cat([next(g) for g in two]))
    evals = [list(adapter.eval_batches(i, 2, None)) for i in range(2)]
    labels = torch.cat([y for part in evals for _, y in part])
    _, all_labels = digit_arrays()
    assert sorted(labels.tolist()) == sorted(all_labels[split_indices()[1]].tolist())
    assert sum(len(y) for _, y in adapter.eval_batches(0, 1, 50)) == 50


def test_teacher_is_accurate_seeded_and_cached(teacher, adapter, cache_dir):
    recipe = adapter.recipe()
    assert teacher_path(recipe, cache_dir).is_file()
    assert heldout_accuracy(teacher) >= 97.0
    again = adapter.build_model()              # from the cache
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert teacher_path(TeacherRecipe(seed=1), cache_dir) != teacher_path(recipe, cache_dir)


def test_checkpoint_and_config_errors(teacher, tmp_path):
    path = tmp_path / "digits.pth"
    torch.save(teacher.state_dict(), path)
    cfg = ModelConfig("classification.digits:DigitsAdapter", "digits_resnet", checkpoint=str(path),
                      kwargs={"width": 32})
    loaded = DigitsAdapter(cfg, {"cache_dir": str(tmp_path / "unused")}).build_model()
    assert heldout_accuracy(loaded) == heldout_accuracy(teacher)
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="model.arch: the digits adapter builds 'digits_resnet'"):
        DigitsAdapter(ModelConfig("x", "resnet18"), {})
    with pytest.raises(ValueError, match="model.kwargs: unknown keys"):
        DigitsAdapter(ModelConfig("x", "digits_resnet", kwargs={"depth": 3}), {})


def test_the_pipeline_compresses_at_least_15x_by_the_papers_accounting(cache_dir):
    cfg = pipeline(cache_dir)
    adapter = make_adapter(cfg.model, cfg.data)
    model = build_architecture(adapter.arch())
    plan = plan_for(cfg, model, adapter)
    report = size_report(model, plan)
    assert report.ratio >= 15
    assert [l.name for l in plan.layers if l.skip] == ["conv1"]
    assert list(plan.stages[2]) == ["layer2.0.conv1", "layer2.0.downsample.0"]   # same input: one stage


# -- the full pipeline on Ray -------------------------------------------------------------------------
class RecordingRayExecutor(RayExecutor):
    """Remembers the last student shipped to the workers (the final student, before evaluation)."""

    def load_student(self, payload):
        self.last_payload = copy.deepcopy(payload)
        return super().load_student(payload)


@pytest.fixture(scope="module")
def full_run(ray_cluster, teacher, cache_dir, tmp_path_factory):
    cfg = pipeline(cache_dir, *QUICK)
    assert cfg.executor.kind == "ray" and cfg.executor.num_workers == 2
    assert cfg.finetune.layerwise.enabled and cfg.finetune.global_.enabled
    out = tmp_path_factory.mktemp("digits_full")
    executor = RecordingRayExecutor(num_workers=2)
    try:
        report = run(cfg, out, executor, progress=False)
    finally:
        executor.close()
    student = load_student(teacher, executor.last_payload)
    return cfg, out, report, student


def test_full_pipeline_keeps_accuracy_at_15x(full_run):
    cfg, out, report, _ = full_run
    before, after = report["metrics_before"], report["metrics_after"]
    assert before["n_images"] == after["n_images"] == 400
    assert before["top1"] >= 97.0
    assert after["top1"] >= before["top1"] - 3.0, (before, after)
    assert report["ratio"] >= 15
    assert report["seconds"]["layerwise"] > 0 and report["seconds"]["global"] > 0
    assert all(s["loss_start"] is not None for s in report["stages"])


def test_the_file_predicts_what_the_in_memory_student_predicts(full_run, adapter):
    cfg, out, report, student = full_run
    loaded = load_compressed(out / "model.bgd")
    assert set(pq_layers(loaded)) == set(pq_layers(student))
    images, labels = adapter.heldout()
    with torch.no_grad():
        from_file, in_memory = loaded(images), student.eval()(images)
        # the file stores centroids in fp16: with the same rounding the logits are identical
        rounded = copy.deepcopy(student)
        for layer in pq_layers(rounded).values():
            layer.centroids.copy_(layer.centroids.half().float())
        assert torch.equal(rounded(images), from_file)
    assert torch.equal(from_file.argmax(1), in_memory.argmax(1))
    top1 = 100.0 * float((from_file.argmax(1) == labels).float().mean())
    assert top1 == pytest.approx(report["metrics_after"]["top1"])


def test_bgd_eval_scores_the_teacher_and_the_file(full_run, cache_dir, capsys):
    cfg, out, report, _ = full_run
    capsys.readouterr()
    assert main(["eval", str(PIPELINE), "--set", f"data.cache_dir={cache_dir}", "--json"]) == 0
    teacher_row = json.loads(capsys.readouterr().out)
    assert teacher_row["top1"] == pytest.approx(report["metrics_before"]["top1"])
    assert teacher_row["ratio"] == 1.0
    assert main(["eval", str(PIPELINE), "--set", f"data.cache_dir={cache_dir}", "--model", str(out / "model.bgd"),
                 "--json"]) == 0
    file_row = json.loads(capsys.readouterr().out)
    assert file_row["top1"] == pytest.approx(report["metrics_after"]["top1"])
    assert file_row["ratio"] == pytest.approx(report["ratio"]) and file_row["ratio"] >= 15
    assert file_row["n_images"] == 400


# -- the objective ------------------------------------------------------------------------------------
def test_activation_aware_objective_reconstructs_layer_outputs_better(teacher, adapter, cache_dir, tmp_path):
    """Same seed, no fine-tuning: Σ_layers ||W x - Ŵ x||² on the teacher's held-out inputs is lower
    for the paper's objective than for weights-only PQ."""
    images, _ = adapter.heldout()
    totals, relative = {}, {}
    for objective in ("paper", "weights"):
        cfg = pipeline(cache_dir, *NO_FINETUNE, f"quantize.objective={objective}", "executor.kind=serial")
        run(cfg, tmp_path / objective, do_eval=False, progress=False)
        errors = layer_output_errors(teacher, load_compressed(tmp_path / objective / "model.bgd"), images)
        assert len(errors) == 9
        totals[objective] = sum(err for err, _ in errors.values())
        relative[objective] = relative_output_error(errors)
    assert totals["paper"] < totals["weights"], totals
    assert relative["paper"] < relative["weights"], relative
