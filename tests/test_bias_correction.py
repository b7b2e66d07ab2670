"""Bias correction (quantize.bias_correction): after a stage is swapped, the student's per-channel
output means go back to the teacher's, through the layer's bias or the BatchNorm that reads it."""

import json

import pytest
import torch

from bgd_dist import load_compressed
from bgd_dist.batchnorm import batchnorm_consumers
from bgd_dist.executor import SerialExecutor
from bgd_dist.messages import OutputMomentsRequest
from bgd_dist.nn.modules import get_submodule
from bgd_dist.runner import Run, allocate, collect, correct_bias, fit, run, swap
from bgd_dist.rundir import corrected_from, load_stage
from bgd_dist.testing import ToyAdapter, toy_convnet

from toy import BASE, toy_config

pytestmark = pytest.mark.usefixtures("one_thread")

NO_FINETUNE = {"layerwise": {"enabled": False}, "global": {"enabled": False}}


def events(out, name):
    return [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["event"] == name]


def corrected_config(folded: bool = False, **quantize):
    return toy_config(model={**BASE["model"], "kwargs": {"width": 8, "folded_bn": folded}},
                      quantize={**BASE["quantize"], "bias_correction": True, **quantize}, finetune=NO_FINETUNE)


def open_run(cfg, out):
    r = Run.open(cfg, out, resume=False, progress=False)
    r.executor = SerialExecutor(num_shards=2)
    r.executor.start(cfg.model, cfg.data)
    allocate(r)
    return r


@pytest.mark.parametrize("folded", [False, True], ids=["bn", "folded_bn"])
def test_after_correction_the_student_output_means_equal_the_teachers(tmp_path, folded):
    """The property: on the stage's calibration images, the corrected output (the layer's own, or
    the BatchNorm's that reads it) has the teacher's per-channel mean; a folded BatchNorm keeps its
    0 / 1 running statistics (the shift goes into its beta)."""
    cfg = corrected_config(folded)
    r = open_run(cfg, tmp_path)
    teacher_bn = {n: (m.running_mean.clone(), m.running_var.clone(), m.bias.clone())
                  for n, m in r.teacher.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    seen = set()
    for st in r.stages():
        collect(r, st)
        fit(r, st)
        swap(r, st)
        correct_bias(r, st)
        r.ship_student()
        # the corrected output: the layer's own (bias) or its BatchNorm's
        outputs = [n if c["into"] == "bias" else c["into"] for n, c in st.corrected.items() if c["into"]]
        moments = r.executor.output_moments(OutputMomentsRequest(outputs, cfg.quantize.n_fit, cfg.quantize.batch_size,
                                                                 r.seeds.collect(st.index)))
        for name in outputs:
            mean_t, var_t = moments.teacher[name].mean_var()
            mean_s, _ = moments.student[name].mean_var()
            torch.testing.assert_close(mean_s, mean_t, rtol=0, atol=1e-5 * float(var_t.sqrt().max()))
        seen |= {c["into"] for c in st.corrected.values()}
    r.executor.close()
    assert {"bias", "bn2", "bn3"} <= seen              # fc's own bias; conv2 -> bn2, conv3 -> bn3
    for name, (mean, var, beta) in teacher_bn.items():
        bn = get_submodule(r.student, name)
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var), name   # never re-estimated
        if folded:
            assert bool((bn.running_mean == 0).all()) and bool((bn.running_var == 1).all())
        assert torch.equal(bn.bias, beta) == (name == "bn1"), name   # bn1 reads the unquantized conv1


def test_the_batchnorm_reading_a_layer_is_found_by_tracing():
    cfg = toy_config()
    adapter = ToyAdapter(cfg.model, cfg.data)
    found = batchnorm_consumers(adapter.build_model(), adapter.trace, ["conv1", "conv2", "conv3", "shortcut", "fc"])
    assert found == {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"}   # shortcut feeds an addition, fc the output


def test_a_layer_without_bias_or_batchnorm_is_left_alone_and_logged(tmp_path, caplog):
    caplog.set_level("WARNING", logger="bgd.runner")
    report = run(corrected_config(), tmp_path, do_eval=False, progress=False)
    records = {e["layer"]: e for e in events(tmp_path, "bias_correction")}
    assert records["shortcut"]["into"] is None and records["fc"]["into"] == "bias"
    assert records["conv2"]["into"] == "bn2" and records["conv2"]["tensor"] == "bn2.bias"
    assert all(e["max_relative_shift"] >= e["mean_relative_shift"] >= 0 for e in records.values())
    assert "shortcut: no bias correction" in caplog.text
    by_stage = {s["stage"]: s for s in report["stages"]}
    assert by_stage[1]["bias_correction"]["shortcut"]["into"] is None
    assert by_stage[2]["bias_correction"]["fc"]["into"] == "bias"
    # the stage files hold the corrected tensors next to the codebooks
    assert set(corrected_from(load_stage(tmp_path / "stages/0/codebooks.pt", ["conv2"]))) == {"bn2.bias"}
    assert set(corrected_from(load_stage(tmp_path / "stages/2/codebooks.pt", ["fc"]))) == {"fc.bias"}


def test_off_by_default_changes_nothing(tmp_path):
    """Without the option: no records, no report entry, the stage files hold only codebooks and the
    student's biases and BatchNorm parameters are the teacher's."""
    cfg = toy_config(finetune=NO_FINETUNE)
    assert cfg.quantize.bias_correction is False
    report = run(cfg, tmp_path, do_eval=False, progress=False)
    assert not events(tmp_path, "bias_correction")
    assert all("bias_correction" not in s for s in report["stages"])
    for s in range(3):
        assert not corrected_from(torch.load(tmp_path / f"stages/{s}/codebooks.pt", weights_only=True))
    dense = toy_convnet(**cfg.model.kwargs).state_dict()
    student = load_compressed(tmp_path / "model.bgd").state_dict()
    for k in ("bn2.bias", "bn3.bias", "fc.bias", "bn2.running_mean"):
        assert torch.equal(student[k], dense[k]), k


def test_resume_restores_the_corrected_tensors_byte_identically(tmp_path):
    """A run interrupted after stage 0 and resumed (stage 0 replayed from its file) writes the same
    model as an uninterrupted one: the replayed stage brings back its corrected BatchNorm beta."""
    cfg = toy_config(quantize={**BASE["quantize"], "bias_correction": True})   # with both distillation phases
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(cfg, whole, do_eval=False, progress=False)
    with pytest.raises(Exception, match="injected failure after stage 0"):
        run(cfg, parts, do_eval=False, progress=False, fail_after_stage=0)
    run(cfg, parts, resume=True, do_eval=False, progress=False)
    assert [e["layer"] for e in events(parts, "bias_correction")].count("conv2") == 1   # not recomputed
    a, b = load_compressed(whole / "model.bgd").state_dict(), load_compressed(parts / "model.bgd").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
