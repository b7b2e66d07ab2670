"""Fine-tuning options, all off by default: BN affine parameters and biases that train, the
supervised loss of the classification adapters, teacher outputs reused across layer-wise phases."""


import pytest
import torch

from bgd_dist import load_compressed
from bgd_dist.executor import SerialExecutor
from bgd_dist.finetune import PhaseSpec, TeacherCache, batchnorms_after, trainable_parameters
from bgd_dist.phases import load_checkpoint, save_checkpoint
from bgd_dist.runner import InjectedFailure, run
from bgd_dist.student import student_state

from toy import quantized_toy, toy_config, toy_setup

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRAS = {"train_bn": True, "train_bias": True}


@pytest.fixture(scope="module")
def setup():
    return quantized_toy()


def _model_state(path):
    return load_compressed(path).state_dict()


def _assert_same_model(a, b):
    sa, sb = _model_state(a), _model_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- which parameters train ------------------------------------------------------------------------
def test_the_bn_after_each_layer_and_the_parameters_of_each_phase(setup):
    cfg, adapter, teacher, plan, student, _ = setup
    after = batchnorms_after(teacher, adapter.trace)
    assert after == {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"}   # the 1x1 shortcut has none
    names, frozen = trainable_parameters(student, ["conv3", "shortcut"], True, True, after)
    assert names == ("bn3.weight", "bn3.bias") and frozen == []      # the toy convs have no bias
    assert trainable_parameters(student, ["fc"], True, True, after)[0] == ("fc.bias",)
    assert trainable_parameters(student, ["fc"], False, False, after)[0] == ()
    assert trainable_parameters(student, None, True, False)[0] == ("bn1.weight", "bn1.bias", "bn2.weight",
                                                                   "bn2.bias", "bn3.weight", "bn3.bias")
    assert trainable_parameters(student, None, False, True)[0] == ("fc.bias",)


def test_frozen_batchnorm_is_left_out_and_named():
    from torchvision.ops import FrozenBatchNorm2d

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), FrozenBatchNorm2d(4))
    after = batchnorms_after(model, lambda m: m(torch.randn(1, 3, 8, 8)))
    assert after == {"0": "1"}
    names, frozen = trainable_parameters(model, ["0"], True, True, after)
    assert names == ("0.bias",) and frozen == ["1"]
    assert trainable_parameters(model, None, True, False) == ((), ["1"])


def test_bn_affine_and_biases_change_only_when_asked(tmp_path):
    outs = {}
    for name, extra in (("off", {}), ("on", EXTRAS)):
        cfg = toy_config(finetune={"layerwise": {"iterations": 3, "batch_size": 8, "lr": 0.01, **extra},
                                   "global": {"epochs": 1, "iterations_per_epoch": 3, "batch_size": 8,
                                              "lr_step_epochs": 1, "lr": 0.001, **extra}})
        run(cfg, tmp_path / name, progress=False, do_eval=False)
        outs[name] = _model_state(tmp_path / name / "model.bgd")
    _, _, teacher, _ = toy_setup()
    dense = teacher.state_dict()
    for k in ("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "bn3.weight", "bn3.bias", "fc.bias"):
        assert torch.equal(outs["off"][k], dense[k]), k
        assert not torch.equal(outs["on"][k], dense[k]), k
    for k in ("conv1.weight", "bn1.running_mean"):   # dense weights never train; BN statistics did before
        assert torch.equal(outs["on"][k], dense[k]) == torch.equal(outs["off"][k], dense[k]), k
    # the layer-wise phase of stage 1 (conv3, shortcut) trained bn3, saved in its stage file
    saved = torch.load(tmp_path / "on" / "stages" / "1" / "codebooks.pt", weights_only=True)
    assert sorted(saved["params"]) == ["bn3.bias", "bn3.weight"]
    assert "params" not in torch.load(tmp_path / "off" / "stages" / "1" / "codebooks.pt", weights_only=True)


def test_weight_decay_spares_the_extra_parameters(setup):
    cfg, adapter, teacher, plan, student, ex = setup
    spec = PhaseSpec("global", 2, 0.05, 0.9, 0.5, 8, train_mode=True, seed=5, params=("bn1.weight", "fc.bias"))
    ex.load_student(student_state(student))
    state = ex.distill(spec)
    groups = state.optimizer["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and len(groups[1]["params"]) == 2
    assert sorted(state.params) == ["bn1.weight", "fc.bias"]


# -- checkpoints, resume, Ray ----------------------------------------------------------------------
def _bits(state):
    out = {f"c.{k}": v for k, v in state.centroids.items()}
    out.update({f"p.{k}": v for k, v in state.params.items()})
    for i, bufs in enumerate(state.buffers):
        out.update({f"b{i}.{k}": v for k, v in bufs.items()})
    for idx, st in state.optimizer["state"].items():
        out[f"m.{idx}"] = st["momentum_buffer"]
    return out


@pytest.mark.parametrize("phase", ["layerwise", "global"])
def test_pieces_through_checkpoint_files_equal_one_run_with_bn_training(setup, tmp_path, phase):
    cfg, adapter, teacher, plan, student, ex = setup
    if phase == "global":
        spec = PhaseSpec("global", 7, 0.05, 0.9, 1e-4, 8, milestones=(4,), gamma=0.5, train_mode=True, seed=5,
                         params=trainable_parameters(student, None, True, True)[0])
    else:
        after = batchnorms_after(teacher, adapter.trace)
        spec = PhaseSpec("layerwise", 7, 0.05, 0.9, 1e-4, 8, layers=tuple(plan.stages[1]), seed=7,
                         params=trainable_parameters(student, list(plan.stages[1]), True, True, after)[0])
    assert spec.params
    ex.load_student(student_state(student))
    straight = ex.distill(spec)
    ex.load_student(student_state(student))
    state = None
    for stop in (2, 5, 7):
        state = ex.distill(spec, state, stop)
        save_checkpoint(tmp_path / "c.pt", spec, state, "d")
        state = load_checkpoint(tmp_path / "c.pt", spec, "d", 1)
    a, b = _bits(straight), _bits(state)
    assert a.keys() == b.keys() and any(k.startswith("p.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert state.losses == straight.losses
    for n in spec.params:   # they trained
        assert not torch.equal(state.params[n], dict(student.named_parameters())[n].detach()), n


def test_interrupt_and_resume_with_bn_training_gives_the_same_file(tmp_path):
    ft = {"layerwise": {"iterations": 3, "batch_size": 8, "lr": 0.01, **EXTRAS},
          "global": {"epochs": 1, "iterations_per_epoch": 3, "batch_size": 8, "lr_step_epochs": 1, "lr": 0.001,
                     **EXTRAS}}
    cfg = toy_config(finetune=ft)
    run(cfg, tmp_path / "straight", progress=False, do_eval=False)
    with pytest.raises(InjectedFailure):
        run(cfg, tmp_path / "resumed", fail_after_stage=1, progress=False, do_eval=False)
    run(cfg, tmp_path / "resumed", resume=True, progress=False, do_eval=False)
    _assert_same_model(tmp_path / "resumed" / "model.bgd", tmp_path / "straight" / "model.bgd")


def test_ray_workers_train_bn_and_biases_like_one_worker_with_the_global_batch(ray_cluster, setup):
    from bgd_dist.distributed.ray_executor import RayExecutor

    # layer-wise (eval mode): data parallel is exact; in train mode each worker's BN normalises
    # with its own share of the batch, as before
    cfg, adapter, teacher, plan, student, one = setup
    layers = ["conv3", "shortcut", "fc"]
    params = trainable_parameters(student, layers, True, True, batchnorms_after(teacher, adapter.trace))[0]
    assert params == ("bn3.weight", "bn3.bias", "fc.bias")
    spec = PhaseSpec("layerwise", 3, 0.05, 0.9, 1e-4, 8, layers=tuple(layers), seed=5, params=params)
    one.load_student(student_state(student))
    single = one.distill(spec)
    ray_ex = RayExecutor(num_workers=2)
    try:
        ray_ex.start(cfg.model, cfg.data)
        ray_ex.load_student(student_state(student))
        parallel = ray_ex.distill(spec)
    finally:
        ray_ex.close()
    assert parallel.params.keys() == single.params.keys() == set(spec.params)
    own = dict(student.named_parameters())
    for n in spec.params:
        assert not torch.equal(single.params[n], own[n].detach()), n   # it trained
        torch.testing.assert_close(parallel.params[n], single.params[n], rtol=1e-5, atol=1e-6)
    for n in single.centroids:
        torch.testing.assert_close(parallel.centroids[n], single.centroids[n], rtol=1e-5, atol=1e-6)


# -- supervised loss of the classification adapters ------------------------------------------------
def _digits(loss="distill", **data):
    from bgd_dist.config import ModelConfig
    from classification.digits import DigitsAdapter

    return DigitsAdapter(ModelConfig("digits", "digits_resnet", kwargs={"width": 4}),
                         {"image_size": 8, "loss": loss, **data})


def test_the_supervised_term_gives_a_gradient_where_distillation_alone_has_none():
    from classification.adapter import LabelledLogits, kl_distill_loss
    from classification.digits import digits_resnet

    torch.manual_seed(0)
    model = digits_resnet(width=4)
    grads = {}
    for loss in ("distill", "supervised", "both"):
        adapter = _digits(loss, supervised_weight=0.5)
        batch = next(adapter.train_batches(0, 1, 6, seed=3))
        if loss == "distill":
            assert isinstance(batch, torch.Tensor)   # the default stream is unlabelled, as before
        else:
            images, labels = batch
            assert labels.dtype == torch.int64 and labels.shape == (6,)
        with torch.no_grad():
            target = adapter.forward(model, batch)
        out = adapter.forward(model, batch)
        model.zero_grad()
        value = adapter.distill_loss(out, target)
        value.backward()
        grads[loss] = model.fc.weight.grad.abs().sum().item()
        if loss == "distill":
            assert torch.equal(value, kl_distill_loss(out, target))
        else:
            assert isinstance(out, LabelledLogits)
            ce = torch.nn.functional.cross_entropy(out.logits, out.labels)
            expected = ce if loss == "supervised" else kl_distill_loss(out.logits, target.logits) + 0.5 * ce
            torch.testing.assert_close(value, expected)
    assert grads["distill"] < 1e-6 < grads["supervised"]   # student == teacher: KL is at its minimum
    assert grads["both"] == pytest.approx(0.5 * grads["supervised"], rel=1e-4)


def test_loss_settings_are_checked_by_name(tmp_path):
    from PIL import Image

    from bgd_dist.config import ModelConfig
    from classification.adapter import ClassificationAdapter

    with pytest.raises(ValueError, match="loss"):
        _digits("labels")
    with pytest.raises(ValueError, match="supervised_weight"):
        _digits("both", supervised_weight=-1.0)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(flat / f"{i}.png")
    model = ModelConfig("classification", "resnet18")
    unlabelled = ClassificationAdapter(model, {"train": str(flat), "loss": "supervised"})
    with pytest.raises(ValueError, match=r"data\.loss.*data\.train"):
        unlabelled.train_set()
    assert len(ClassificationAdapter(model, {"train": str(flat)}).train_set()) == 2   # distill: fine
    folders = tmp_path / "folders"
    for c in ("a", "b"):
        (folders / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folders / c / "x.png")
    labelled = ClassificationAdapter(model, {"train": str(folders), "loss": "both", "image_size": 8, "resize": 8})
    images, labels = next(labelled.train_batches(0, 1, 4, seed=0))
    assert images.shape == (4, 3, 8, 8) and set(labels.tolist()) <= {0, 1}


# -- teacher outputs reused across the layer-wise phases -------------------------------------------
def test_the_teacher_cache_changes_nothing_and_saves_teacher_forwards(tmp_path):
    def config(cache_mb):
        return toy_config(finetune={"layerwise": {"iterations": 3, "batch_size": 8, "lr": 0.01,
                                                  "reuse_teacher": True, "teacher_cache_mb": cache_mb},
                                    "global": {"enabled": False}})

    caches = {}
    for name, mb in (("off", 0), ("on", 1024), ("tiny", 1e-4)):   # tiny: over the cap, no entry fits
        ex = SerialExecutor(num_shards=1)
        ex.start(config(mb).model, config(mb).data)
        try:
            run(config(mb), tmp_path / name, executor=ex, progress=False, do_eval=False)
            caches[name] = ex.worker.teacher_cache
        finally:
            ex.close()
    assert caches["off"] is None
    on = caches["on"]
    assert (on.misses, on.hits, len(on.outputs)) == (3, 6, 3)     # 3 stages x 3 steps, one teacher pass per step
    assert (caches["tiny"].hits, caches["tiny"].full) == (0, True)
    _assert_same_model(tmp_path / "on" / "model.bgd", tmp_path / "off" / "model.bgd")
    _assert_same_model(tmp_path / "tiny" / "model.bgd", tmp_path / "off" / "model.bgd")


def test_a_cache_of_another_stream_starts_empty():
    cache = TeacherCache()
    cache.bind((1, 8, 0, 1), 1e6)
    cache.get(0, lambda: torch.ones(2))
    assert torch.equal(cache.get(0, lambda: torch.zeros(2)), torch.ones(2)) and cache.hits == 1
    cache.bind((2, 8, 0, 1), 1e6)
    assert torch.equal(cache.get(0, lambda: torch.zeros(2)), torch.zeros(2)) and cache.hits == 1


def test_the_options_are_off_by_default_and_checked_by_name():
    from bgd_dist.config import ConfigError

    f = toy_config().finetune
    assert not (f.layerwise.train_bn or f.layerwise.train_bias or f.layerwise.reuse_teacher)
    assert not (f.global_.train_bn or f.global_.train_bias)
    with pytest.raises(ConfigError, match="teacher_cache_mb"):
        toy_config(finetune={"layerwise": {"teacher_cache_mb": -1}})
    with pytest.raises(ConfigError, match="train_bn"):
        toy_config(finetune={"global": {"train_bn": "yes"}})
