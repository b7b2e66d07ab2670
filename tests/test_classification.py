"""The classification adapter: torchvision models, image folders, shards, evaluation, `bgd eval`."""

import json
import urllib.error

import pytest
import torch
import torchvision
import yaml
from PIL import Image

from bgd_dist import load_compressed
from bgd_dist.adapters import Adapter, Evaluator, make_adapter
from bgd_dist.cli import main
from bgd_dist.config import ConfigError, ModelConfig, pipeline_from_dict
from classification.adapter import ClassificationAdapter, kl_distill_loss
from classification.data import calibration_indices, eval_indices, global_batches
from classification.evaluation import TopKEvaluator, topk_correct
from classification.models import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLASSES = 3


# -- models ------------------------------------------------------------------------------------------
def small_resnet18(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None, num_classes=N_CLASSES).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "resnet18_3.pth"
    torch.save(small_resnet18().state_dict(), path)
    return path


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_checkpoint_round_trip(checkpoint, tmp_path):
    model = build_classifier("resnet18", checkpoint=str(checkpoint), num_classes=N_CLASSES)
    assert not model.training
    assert_same_state(model, small_resnet18())
    # a training checkpoint: {"state_dict": ...} with DataParallel's "module." prefix
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in small_resnet18().state_dict().items()}},
               wrapped)
    assert_same_state(build_classifier("resnet18", checkpoint=str(wrapped), num_classes=N_CLASSES), model)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.checkpoint: .*nope.pth does not exist"):
        build_classifier("resnet18", checkpoint=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        build_classifier("resnet18", checkpoint=str(bad))
    with pytest.raises(ValueError, match="unknown torchvision classifier 'resnet19'"):
        build_classifier("resnet19")
    with pytest.raises(ValueError, match="'IMAGENET1K_V9' is not one of .*IMAGENET1K_V1"):
        build_classifier("resnet18", weights="IMAGENET1K_V9")


def test_offline_download_says_to_pass_a_local_checkpoint(monkeypatch):
    real = torchvision.models.get_model_builder

    def offline_builder(name):
        builder = real(name)

        def build(weights=None, **kwargs):
            if weights is not None:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
            return builder(weights=None, **kwargs)
        return build

    monkeypatch.setattr(torchvision.models, "get_model_builder", offline_builder)
    with pytest.raises(RuntimeError) as info:
        build_classifier("resnet50", weights="IMAGENET1K_V1")
    msg = str(info.value)
    assert "could not download the resnet50 weights IMAGENET1K_V1" in msg
    assert "--set model.checkpoint=" in msg and "resnet50-0676ba61.pth" in msg
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_adapter_requires_a_given_checkpoint():
    cfg = ModelConfig("classification", "resnet50", None, "???")
    with pytest.raises(ConfigError, match=r"model.checkpoint is required: pass --set model.checkpoint="):
        ClassificationAdapter(cfg, {}).build_model()


def test_adapter_follows_the_protocol():
    adapter = make_adapter(ModelConfig("classification", "resnet18"), {"example_size": 32})
    assert isinstance(adapter, Adapter) and isinstance(adapter.evaluator(), Evaluator)
    assert adapter.arch() == {"factory": "classification.models:build_classifier", "kwargs": {"arch": "resnet18"}}
    with pytest.raises(ConfigError, match="data: unknown key 'trian'"):
        make_adapter(ModelConfig("classification", "resnet18"), {"trian": "/data"})


# -- loss and evaluator ---------------------------------------------------------------------------------
def test_distillation_loss_is_kl_of_teacher_to_student_batch_mean():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    p = t.softmax(1)
    expected = (p * (p.log() - s.log_softmax(1))).sum() / 6
    torch.testing.assert_close(kl_distill_loss(s, t), expected)
    assert float(kl_distill_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_topk_counts_and_merge_across_shards():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1], [0, 1, 2, 3, 4, 5, 6], [1, 0, .5, .4, .3, .2, .1],
                           [0, 3, 2, 1, 0, 0, 0]])
    labels = torch.tensor([0, 1, 6, 2])       # top-1 hit; 6th; 6th; 2nd
    assert topk_correct(logits, labels, (1, 5)) == {1: 1, 5: 2}
    assert topk_correct(logits[:, :3], labels.clamp(max=2), (1, 5)) == {1: 1, 5: 4}   # k > C: every row
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(50, 10, generator=gen), torch.randint(10, (50,), generator=gen)
    whole = TopKEvaluator()
    whole.process((None, labels), logits)
    shards = []
    for i in range(3):
        e = TopKEvaluator()
        e.process((None, labels[i::3]), logits[i::3])
        shards.append(json.loads(json.dumps(e.state())))          # plain data
    merged = TopKEvaluator()
    merged.merge(shards)
    assert merged.result() == whole.result()
    r = whole.result()
    assert r["n_images"] == 50
    assert r["top1"] == pytest.approx(100 * float((logits.argmax(1) == labels).float().mean()))
    assert r["top1"] <= r["top5"] <= 100


# -- shards --------------------------------------------------------------------------------------------
def test_calibration_shards_are_disjoint_and_cover_the_subset():
    parts = [calibration_indices(100, i, 3, 40, seed=7) for i in range(3)]
    again = calibration_indices(100, 1, 3, 40, seed=7)
    assert torch.equal(parts[1][0], again[0]) and torch.equal(parts[1][1], again[1])
    idx = torch.cat([p[0] for p in parts])
    seeds = torch.cat([p[1] for p in parts])
    assert len(idx) == 40 and len(set(idx.tolist())) == 40 and len(set(seeds.tolist())) == 40
    one, _ = calibration_indices(100, 0, 1, 40, seed=7)
    assert sorted(idx.tolist()) == sorted(one.tolist())
    # more images than exist: every image, then again with fresh augmentation seeds
    cyc, cyc_seeds = calibration_indices(10, 0, 1, 25, seed=0)
    assert sorted(torch.bincount(cyc, minlength=10).tolist()) == [2] * 5 + [3] * 5
    assert len(set(cyc_seeds.tolist())) == 25


def test_global_batches_do_not_depend_on_the_number_of_workers():
    one = global_batches(50, 0, 1, 8, seed=3)
    two = [global_batches(50, i, 2, 4, seed=3) for i in range(2)]
    for _ in range(3):
        idx, seeds = next(one)
        parts = [next(g) for g in two]
        assert torch.equal(idx, torch.cat([p[0] for p in parts]))
        assert torch.equal(seeds, torch.cat([p[1] for p in parts]))


def test_eval_shards_cover_a_fixed_subset():
    parts = [eval_indices(20, i, 3, None) for i in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(20))
    sub = [eval_indices(20, i, 2, 7) for i in range(2)]
    flat = torch.cat(sub)
    assert len(set(flat.tolist())) == 7 and torch.equal(eval_indices(20, 0, 2, 7), sub[0])
    with pytest.raises(ValueError, match="shard 2 of 2"):
        eval_indices(20, 2, 2, None)


# -- image folders --------------------------------------------------------------------------------------
def write_png(path, seed, size):
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    base = torch.rand(3, 1, 1, generator=gen)
    img = (base + 0.3 * torch.rand(3, h, w, generator=gen)).clamp(0, 1)
    Image.fromarray((img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train/ and val/ in ImageFolder layout (3 classes), and a flat folder of unlabelled images."""
    root = tmp_path_factory.mktemp("images")
    seed = 0
    for split, per_class in (("train", 6), ("val", 4)):
        for c in range(N_CLASSES):
            d = root / split / f"n0000{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                write_png(d / f"img_{i}.png", seed, (40 + 3 * i, 48 - 2 * i))
    flat = root / "flat"
    flat.mkdir()
    for i in range(5):
        write_png(flat / f"{i}.png", 100 + i, (36, 36))
    (flat / "notes.txt").write_text("not an image")
    return root


def folder_adapter(folders, **data):
    conf = {"train": str(folders / "train"), "val": str(folders / "val"), "image_size": 32, "resize": 36,
            "example_size": 32, **data}
    return ClassificationAdapter(ModelConfig("classification", "resnet18", kwargs={"num_classes": N_CLASSES}), conf)


def test_calibration_from_an_image_folder_is_sharded_and_deterministic(folders):
    adapter = folder_adapter(folders)
    shards = [list(adapter.calibration_batches(i, 2, 10, 4, seed=1)) for i in range(2)]
    assert [b.shape[0] for b in shards[0]] == [4, 1] and [b.shape[0] for b in shards[1]] == [4, 1]
    assert shards[0][0].shape[1:] == (3, 32, 32) and shards[0][0].dtype == torch.float32
    again = list(adapter.calibration_batches(1, 2, 10, 4, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(again, shards[1]))
    other = list(adapter.calibration_batches(1, 2, 10, 4, seed=2))
    assert not torch.equal(other[0], shards[1][0])
    # a DataLoader worker process gives the same pixels (augmentations are seeded per image)
    workers = list(folder_adapter(folders, num_workers=1).calibration_batches(1, 2, 10, 4, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(workers, shards[1]))


def test_train_batches_are_the_same_global_batch_for_any_number_of_workers(folders):
    adapter = folder_adapter(folders)
    one = adapter.train_batches(0, 1, 6, seed=5)
    two = [adapter.train_batches(i, 2, 3, seed=5) for i in range(2)]
    firsts = []
    for _ in range(2):
        whole = next(one)
        firsts.append(whole)
        assert whole.shape == (6, 3, 32, 32)
        assert torch.equal(whole, torch.cat([next(g) for g in two]))
    assert not torch.equal(firsts[0], firsts[1])
    # the endless stream through a DataLoader worker process: the same pixels
    stream = folder_adapter(folders, num_workers=1).train_batches(0, 1, 6, seed=5)
    assert all(torch.equal(next(stream), f) for f in firsts)


def test_a_flat_folder_works_for_calibration_not_for_evaluation(folders):
    adapter = folder_adapter(folders, train=str(folders / "flat"), val=str(folders / "flat"))
    assert len(adapter.train_set()) == 5
    batches = list(adapter.calibration_batches(0, 1, 8, 8, seed=0))    # 8 > 5: cycled
    assert [b.shape[0] for b in batches] == [8]
    with pytest.raises(ValueError, match="data.val: .*flat has no class sub-folders"):
        next(adapter.eval_batches(0, 1, None))


def test_missing_dataset_paths_are_named(folders, tmp_path):
    adapter = folder_adapter(folders, train=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"data.train: {tmp_path / 'missing'} does not exist"):
        next(adapter.calibration_batches(0, 1, 4, 4, seed=0))
    adapter = folder_adapter(folders, val="???")
    with pytest.raises(ConfigError, match=r"data.val is required: pass --set data.val="):
        next(adapter.eval_batches(0, 1, None))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="data.train: no images"):
        next(folder_adapter(folders, train=str(empty)).train_batches(0, 1, 2, seed=0))


def test_eval_batches_carry_the_folder_labels(folders):
    adapter = folder_adapter(folders, eval_batch_size=5)
    batches = list(adapter.eval_batches(0, 1, None))
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batches[0][0].shape == (5, 3, 32, 32)
    halves = [torch.cat([y for _, y in adapter.eval_batches(i, 2, None)]) for i in range(2)]
    assert sorted(torch.cat(halves).tolist()) == sorted(labels.tolist())
    assert adapter.batch_len(batches[0]) == 5
    moved = adapter.to_device(batches[0], "cpu")
    assert torch.equal(moved[1], batches[0][1])


# -- end to end: bgd quantize + bgd eval on the folders -------------------------------------------------
@pytest.fixture(scope="module")
def folder_pipeline(folders, checkpoint, tmp_path_factory):
    raw = {
        "name": "resnet18_folders",
        "model": {"adapter": "classification", "arch": "resnet18", "checkpoint": str(checkpoint),
                  "kwargs": {"num_classes": N_CLASSES}},
        "data": {"train": str(folders / "train"), "val": str(folders / "val"), "image_size": 32, "resize": 36,
                 "example_size": 32},
        "quantize": {"n_iter": 2, "n_calibration": 8, "batch_size": 8, "rules": [
            {"match": "conv1", "skip": True},
            {"match": "fc", "block_size": 4},
            {"match": ".*", "kernel": [3, 3], "block_size": 9},
            {"match": ".*", "kernel": [1, 1], "block_size": 4}]},
        "finetune": {"layerwise": {"iterations": 1, "batch_size": 4},
                     "global": {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 4}},
        "executor": {"kind": "serial", "num_workers": 2},
    }
    path = tmp_path_factory.mktemp("pipe") / "resnet18_folders.yaml"
    path.write_text(yaml.safe_dump(raw))
    pipeline_from_dict(raw)  # valid
    return path


def eval_json(capsys, *argv):
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_bgd_quantize_and_eval_on_image_folders(folder_pipeline, folders, tmp_path, capsys):
    teacher = eval_json(capsys, str(folder_pipeline))
    assert teacher["ratio"] == 1.0 and teacher["n_images"] == 12
    assert teacher["size_mb"] == pytest.approx(42.64, abs=0.01)           # resnet18 with a 3-way fc
    # the score is the teacher's on the val folder, computed here independently
    adapter = folder_adapter(folders)
    model = small_resnet18()
    batches = list(adapter.eval_batches(0, 1, None))
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert teacher["top1"] == pytest.approx(100 * float((pred == labels).float().mean()))

    out = tmp_path / "run"
    assert main(["quantize", str(folder_pipeline), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ratio"] > 10
    compressed = eval_json(capsys, str(folder_pipeline), "--model", str(out / "model.bgd"))
    assert compressed["ratio"] == pytest.approx(report["ratio"], rel=1e-6)
    assert compressed["n_images"] == 12
    loaded = load_compressed(out / "model.bgd")
    with torch.no_grad():
        pred = torch.cat([loaded(x).argmax(1) for x, _ in batches])
    assert compressed["top1"] == pytest.approx(100 * float((pred == labels).float().mean()))

    # the human-readable table
    capsys.readouterr()
    assert main(["eval", str(folder_pipeline), "--max-images", "6"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()[-2:]
    assert header.split() == ["model", "size_mb", "ratio", "top1", "top5", "n_images"]
    assert row.split()[-1] == "6"


def test_bgd_eval_names_a_missing_dataset(folder_pipeline, tmp_path, capsys):
    code = main(["eval", str(folder_pipeline), "--set", f"data.val={tmp_path / 'nowhere'}"])
    assert code == 2
    assert f"data.val: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_other_torchvision_classifiers_plan_through_the_adapter():
    """Any torchvision classifier with Conv2d / Linear layers: here MobileNetV2 (depthwise 3x3 convs,
    one 9-value subvector per channel, and a Linear head)."""
    from bgd_dist.adapters import plan_for

    raw = {"name": "mobilenet_v2", "model": {"adapter": "classification", "arch": "mobilenet_v2"},
           "data": {"example_size": 64},
           "quantize": {"rules": [{"match": "features\\.0\\.0", "skip": True},
                                  {"match": ".*", "kind": "linear", "block_size": 4},
                                  {"match": ".*", "kernel": [3, 3], "block_size": 9},
                                  {"match": ".*", "kernel": [1, 1], "block_size": 4}]}}
    cfg = pipeline_from_dict(raw)
    adapter = make_adapter(cfg.model, cfg.data)
    plan = plan_for(cfg, adapter.build_model(), adapter)
    depthwise = plan.layer("features.2.conv.1.0")
    assert depthwise.geometry.groups == 96 and depthwise.block_size == 9 and depthwise.n_subvectors == 96
    assert plan.layers[-1].name == "classifier.1" and not plan.layers[-1].skip
    assert len(plan.quantized) == len(plan.layers) - 1
