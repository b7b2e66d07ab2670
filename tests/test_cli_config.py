"""Configuration and command-line behaviour: required keys at once, numbers, list overrides, rules
that match nothing, flags after the subcommand, a closed pipe, data errors naming the file,
evaluation of a compressed file without the teacher."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import bgd_dist
from bgd_dist import cli
from bgd_dist.adapters import make_adapter, plan_for
from bgd_dist.config import ConfigError, load_pipeline, missing_keys
from bgd_dist.runner import run

from toy import toy_config

ROOT = Path(__file__).resolve().parents[1]
RESNET18 = str(ROOT / "pipelines" / "resnet18_small.yaml")


@pytest.fixture
def no_teacher(monkeypatch):
    """Fail the test if a classification model with weights is built."""
    import classification.adapter

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was built")

    monkeypatch.setattr(classification.adapter, "build_classifier", refuse)


def test_every_missing_key_at_once_before_any_model(no_teacher, tmp_path):
    cfg = load_pipeline(RESNET18)
    assert missing_keys(cfg) == ["data.train", "data.val"]
    with pytest.raises(ConfigError, match=r"resnet18_small.yaml: required settings missing: data.train, data.val; "
                                          r"pass --set data.train=... --set data.val=..."):
        run(cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"missing: data.train;"):   # no evaluation: the training data only
        run(cfg, tmp_path, do_eval=False)
    assert cli.main(["quantize", RESNET18, "--out", str(tmp_path), "--executor", "serial"]) == 2


def test_floats_in_yaml_1_1_exponent_form(tmp_path):
    cfg = load_pipeline(RESNET18, ["finetune.layerwise.lr=1e-3", "finetune.global.lr=-2.5E-4"])
    assert cfg.finetune.layerwise.lr == 0.001 and cfg.finetune.global_.lr == -0.00025
    with pytest.raises(ConfigError, match="expected a number, got 'fast'"):
        load_pipeline(RESNET18, ["finetune.layerwise.lr=fast"])


def test_overrides_into_list_items():
    cfg = load_pipeline(RESNET18, ["quantize.rules.1.block_size=8", "quantize.rules.0.skip=false",
                                   "quantize.rules.0.block_size=3"])
    assert cfg.quantize.rules[1].block_size == 8 and cfg.quantize.rules[1].match == "fc"
    assert not cfg.quantize.rules[0].skip and cfg.quantize.rules[0].block_size == 3
    with pytest.raises(ConfigError, match=r"quantize.rules is a list of 4 items; '7' is not an index of it"):
        load_pipeline(RESNET18, ["quantize.rules.7.block_size=8"])


def test_a_rule_that_matches_no_layer_is_an_error_naming_it():
    cfg = toy_config(quantize={"rules": [
        {"match": "conv_1", "skip": True}, {"match": ".*", "kernel": [3, 3], "block_size": 9},
        {"match": ".*", "block_size": 4}]})
    with pytest.raises(ValueError, match=r"quantize.rules\[0\] {match: 'conv_1'} matches no layer .*conv1"):
        plan_for(cfg)
    cfg = load_pipeline(RESNET18, ["quantize.rules.2.kernel=[5, 5]"])
    with pytest.raises(ValueError, match=r"rules\[2\] {match: '.\*', kernel: \(5, 5\)} matches no layer"):
        plan_for(cfg)


def test_verbose_after_the_subcommand():
    parser = cli.get_args_parser()
    assert parser.parse_args(["size", RESNET18, "-v"]).verbose
    assert parser.parse_args(["-v", "size", RESNET18]).verbose
    assert not parser.parse_args(["size", RESNET18]).verbose


def test_a_closed_pipe_is_not_an_error():
    """``bgd size ... | head``: the reader is gone before the table is written."""
    p = subprocess.Popen([sys.executable, "-m", "bgd_dist.cli", "size", RESNET18, "--set", "data.example_size=32"],
                         cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                                    # before the interpreter has even imported torch
    err = p.stderr.read().decode()
    assert p.wait() == 0
    assert "Broken pipe" not in err and "Traceback" not in err and "BrokenPipeError" not in err


def test_data_errors_name_the_pipeline_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(RESNET18).read_text().replace("  eval_batch_size: 256", "  eval_batchsize: 256"))
    with pytest.raises(ConfigError, match=r"bad.yaml: data: unknown key 'eval_batchsize'"):
        load_pipeline(bad)
    good = tmp_path / "good.yaml"
    good.write_text(Path(RESNET18).read_text())
    with pytest.raises(ConfigError, match=r"good.yaml: .*crop_scale must satisfy"):
        load_pipeline(good, ["data.crop_scale=[0.5, 0.1]"])


def test_maskrcnn_checkpoint_needs_an_explicit_bn_eps():
    from detection.models import build_maskrcnn

    cfg = load_pipeline(ROOT / "pipelines" / "maskrcnn_r50_fpn.yaml", ["model.weights=null",
                                                                      "model.checkpoint=/x/weights.pth"])
    assert make_adapter(cfg.model, cfg.data).arch()["kwargs"]["bn_eps"] == 0.0     # the pipeline says so
    with pytest.raises(ConfigError, match="model.kwargs.bn_eps: required with model.checkpoint"):
        load_pipeline(ROOT / "pipelines" / "maskrcnn_r50_fpn.yaml", ["model.weights=null",
                                                                    "model.checkpoint=/x/weights.pth",
                                                                    "model.kwargs={}"])
    with pytest.raises(ValueError, match="bn_eps: required with model.checkpoint"):
        build_maskrcnn("maskrcnn_resnet50_fpn", checkpoint="/x/weights.pth")


def test_eval_a_compressed_file_needs_only_the_data(no_teacher, tmp_path, capsys):
    """``bgd eval --model``: the pipeline's weights (IMAGENET1K_V1, a download) are never built."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    bgd_dist.compress(model, torch.randn(4, 3, 32, 32), tmp_path / "run", rules=[
        {"match": "fc", "block_size": 4}, {"match": ".*", "skip": True}], n_iter=1, n_calibration=4, batch_size=4,
        arch={"factory": "classification.models:build_classifier", "kwargs": {"arch": "resnet18"}}, progress=False)
    for label in ("a", "b"):
        (tmp_path / "val" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (40 * i, 100, 200)).save(tmp_path / "val" / label / f"{i}.png")
    rc = cli.main(["eval", RESNET18, "--model", str(tmp_path / "run" / "model.bgd"), "--executor", "serial",
                   "--set", f"data.val={tmp_path / 'val'}", "--set", "data.resize=36", "--set", "data.image_size=32",
                   "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and '"top1"' in out and "model.bgd" in out
    # the training data is not needed either, but the evaluation data is, by name
    assert cli.main(["eval", RESNET18, "--model", str(tmp_path / "run" / "model.bgd")]) == 2
    assert "missing: data.val;" in capsys.readouterr().err
