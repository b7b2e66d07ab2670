"""Fine-tuning that does not destroy the student: learning rates scaled to the batch size."""

import glob

import pytest

from bgd_dist.config import ConfigError, load_pipeline
from bgd_dist.finetune import global_spec, layerwise_spec


@pytest.mark.parametrize("path", sorted(glob.glob("pipelines/*.yaml")))
def test_every_pipeline_gets_its_own_learning_rates_at_its_reference_batch(path):
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
