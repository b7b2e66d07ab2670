"""Fine-tuning that does not destroy the student: learning rates scaled to the batch size."""

import glob
import importlib.util

import pytest
import torch

from bgd_dist.config import ConfigError, load_pipeline
from bgd_dist.finetune import global_spec, layerwise_spec


@pytest.mark.parametrize("path", sorted(glob.glob("pipelines/*.yaml")))
def test_every_pipeline_gets_its_own_learning_rates_at_its_reference_batch(path):
    if "detectron2" in path and importlib.util.find_spec("detectron2") is None:
        pytest.skip("detectron2 is not installed (its adapter checks the pipeline's model section)")
    cfg = load_pipeline(path)
    for phase in (cfg.finetune.layerwise, cfg.finetune.global_):
        assert phase.lr_reference_batch == phase.batch_size
        assert phase.effective_lr == phase.lr


def test_a_smaller_batch_scales_the_paper_learning_rates_linearly():
    paper = load_pipeline("pipelines/resnet18_large.yaml")
    assert layerwise_spec(paper.finetune.layerwise, ["conv1"]).lr == 0.05
    assert global_spec(paper.finetune.global_).lr == 0.01
    small = load_pipeline("pipelines/resnet18_large.yaml",
                          ["finetune.layerwise.batch_size=8", "finetune.global.batch_size=32"])
    assert layerwise_spec(small.finetune.layerwise, ["conv1"]).lr == pytest.approx(0.05 * 8 / 128)
    assert global_spec(small.finetune.global_).lr == pytest.approx(0.01 * 32 / 128)
    sqrt = load_pipeline("pipelines/resnet18_large.yaml",
                         ["finetune.layerwise.batch_size=32", "finetune.layerwise.lr_scaling=sqrt"])
    assert sqrt.finetune.layerwise.effective_lr == pytest.approx(0.05 * 0.5)
    fixed = load_pipeline("pipelines/resnet18_large.yaml",
                          ["finetune.layerwise.batch_size=32", "finetune.layerwise.lr_scaling=none"])
    assert fixed.finetune.layerwise.effective_lr == 0.05


def test_an_unknown_scaling_rule_is_refused_by_name():
    with pytest.raises(ConfigError, match="lr_scaling"):
        load_pipeline("pipelines/resnet18_large.yaml", ["finetune.global.lr_scaling=cubic"])


# -- folded BatchNorm -----------------------------------------------------------------------------
def folded_toy(tmp_path, mode, folded=True):
    from bgd_dist import load_compressed
    from bgd_dist.runner import run

    from toy import toy_config

    cfg = toy_config(model={"adapter": "bgd_dist.testing:ToyAdapter", "arch": "toy",
                            "kwargs": {"width": 8, "folded_bn": folded}},
                     finetune={"layerwise": {"iterations": 3, "batch_size": 8, "lr": 0.01},
                               "global": {"epochs": 1, "iterations_per_epoch": 30, "batch_size": 8,
                                          "lr_step_epochs": 1, "lr": 0.001, "folded_bn": mode}})
    report = run(cfg, tmp_path / mode, progress=False)
    return report, load_compressed(tmp_path / mode / "model.bgd")


@pytest.fixture(scope="module")
def folded_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folded")
    return {mode: folded_toy(tmp, mode) for mode in ("train", "eval", "unfold")}


def test_folded_batchnorm_is_flagged_at_plan_time_and_survives_the_global_phase(folded_runs):
    agreement = {mode: report["metrics_after"]["agreement"] for mode, (report, _) in folded_runs.items()}
    for mode, (report, _) in folded_runs.items():
        assert report["folded_bn"] == {"layers": ["bn1", "bn2", "bn3"], "mode": mode}
        assert report["metrics_before"]["agreement"] == 1.0
    # train mode normalises by batch statistics the folded network never had
    assert agreement["train"] < 0.9 <= min(agreement["eval"], agreement["unfold"])


def test_kept_in_eval_mode_means_untouched_and_unfolded_means_real_statistics(folded_runs):
    _, kept = folded_runs["eval"]
    _, unfolded = folded_runs["unfold"]
    for name in ("bn1", "bn2", "bn3"):
        assert torch.equal(kept.get_submodule(name).running_mean, torch.zeros_like(kept.get_submodule(name).running_mean))
        assert torch.equal(kept.get_submodule(name).running_var, torch.ones_like(kept.get_submodule(name).running_var))
        assert (unfolded.get_submodule(name).running_var - 1).abs().max() > 0.1


def test_a_network_that_is_not_folded_is_not_flagged(tmp_path):
    report, _ = folded_toy(tmp_path, "eval", folded=False)
    assert "folded_bn" not in report


def test_an_unknown_folded_bn_mode_is_refused_by_name():
    with pytest.raises(ConfigError, match="folded_bn"):
        load_pipeline("pipelines/resnet18_large.yaml", ["finetune.global.folded_bn=sometimes"])


# -- divergence guard ------------------------------------------------------------------------------
def diverging_run(tmp_path, lr, mode, executor=None, **finetune):
    import json

    from bgd_dist.runner import run

    from toy import toy_config

    cfg = toy_config(finetune={"layerwise": {"iterations": 6, "batch_size": 8, "lr": lr},
                               "global": {"enabled": False}, "checkpoint_every": 2, "on_divergence": mode,
                               **finetune},
                     **({"executor": executor} if executor else {}))
    try:
        report = run(cfg, tmp_path, do_eval=False, progress=False)
    finally:
        events = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    return report, events


def test_a_too_large_lr_ends_in_the_guards_one_line_message(tmp_path):
    from bgd_dist.runner import DistillationDiverged

    with pytest.raises(DistillationDiverged) as caught:
        diverging_run(tmp_path, 100.0, "fail")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("layer-wise distillation of stage 1/3 diverged at step 2 with lr 100: "
                              "the loss rose from ")
    import json

    events = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    [event] = [e for e in events if e["event"] == "divergence"]
    assert (event["phase"], event["stage"], event["step"], event["lr"], event["action"]) == \
        ("layerwise", 0, 2, 100.0, "fail")
    assert not (tmp_path / "model.bgd").exists()


def test_a_non_finite_loss_is_caught_on_the_worker_with_its_step(tmp_path):
    from bgd_dist.runner import DistillationDiverged

    with pytest.raises(DistillationDiverged, match=r"stage 1/3 diverged at step \d with lr 1e\+30: the loss or its "
                                                   r"gradient is not finite"):
        diverging_run(tmp_path, 1e30, "fail", divergence_factor=0)


def test_retrying_at_lower_rates_finishes_the_run_from_the_phases_start(tmp_path):
    report, events = diverging_run(tmp_path, 100.0, "retry_lower_lr")
    divergences = [e for e in events if e["event"] == "divergence"]
    assert divergences and all(e["action"] == "retry" for e in divergences)
    stage0 = [e["lr"] for e in events if e["event"] == "phase_lr" and e["stage"] == 0]
    assert stage0 == pytest.approx([100.0, 10.0, 1.0][:len(stage0)]) and len(stage0) >= 2
    # every attempt starts where the phase started: the same first loss; the accepted one stays near it
    assert f"the loss rose from {report['stages'][0]['loss_start']:.4g} to " in divergences[0]["reason"]
    assert report["stages"][0]["loss_end"] < 10 * report["stages"][0]["loss_start"]
    assert (tmp_path / "model.bgd").is_file()


def test_retries_are_bounded(tmp_path):
    from bgd_dist.runner import DistillationDiverged

    with pytest.raises(DistillationDiverged, match=r"after 1 retry at lower rates"):
        diverging_run(tmp_path, 1e30, "retry_lower_lr", max_lr_retries=1, lr_backoff=0.5, divergence_factor=0)


@pytest.mark.slow
def test_the_guard_works_across_ray_workers(ray_cluster, tmp_path):
    from bgd_dist.runner import DistillationDiverged

    with pytest.raises(DistillationDiverged, match=r"stage 1/3 diverged at step 2 with lr 100"):
        diverging_run(tmp_path, 100.0, "fail", executor={"kind": "ray", "num_workers": 2})
