"""Honest objectives: the effective rank of every layer's statistics (warned when deficient),
hessian.damp: auto, and the fitted codebooks' objective on held-out calibration images."""

import json

import pytest
import torch

from bgd_dist.config import ConfigError, load_pipeline
from bgd_dist.core.hessian import auto_damp, effective_rank
from bgd_dist.core.stats import GramStats, HessianStats
from bgd_dist.messages import FitJob, FitSettings
from bgd_dist.nn.modules import get_submodule
from bgd_dist.objectives import layer_damp, objective, relative_objective
from bgd_dist.runner import load_stage_stats, run
from bgd_dist.sharding import calibration_items

from toy import BASE, toy_config, toy_setup

pytestmark = pytest.mark.usefixtures("one_thread")


def events(out, name):
    return [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["event"] == name]


def test_effective_rank_counts_the_directions_the_rows_span():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    assert effective_rank(rows.T @ rows) == 5
    full = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    assert effective_rank(full.T @ full) == 12
    assert effective_rank(torch.zeros(4, 4)) == 0


def test_auto_damping_is_the_default_at_full_rank_and_grows_with_the_deficiency():
    assert auto_damp(12, 12) == 0.01
    assert auto_damp(6, 12) == pytest.approx(0.02)
    assert auto_damp(1, 1000) == 1.0 and auto_damp(0, 8) == 1.0
    h = torch.eye(8, dtype=torch.float64)
    h[4:, 4:] = 0
    assert layer_damp("auto", h) == pytest.approx(0.02) and layer_damp(0.05, h) == 0.05


def test_damp_auto_and_holdout_are_validated_by_name():
    assert load_pipeline("pipelines/digits.yaml", ["quantize.hessian.damp=auto"]).quantize.hessian.damp == "auto"
    assert load_pipeline("pipelines/digits.yaml").quantize.hessian.damp == 0.01
    with pytest.raises(ConfigError, match="damp: expected a number > 0 or auto"):
        load_pipeline("pipelines/digits.yaml", ["quantize.hessian.damp=sometimes"])
    with pytest.raises(ConfigError, match=r"holdout: must be in \[0, 1\)"):
        load_pipeline("pipelines/digits.yaml", ["quantize.holdout=1.5"])
    with pytest.raises(ConfigError, match="holdout: .* leaves 0 held-out"):
        load_pipeline("pipelines/digits.yaml", ["quantize.holdout=0.0001"])
    q = load_pipeline("pipelines/digits.yaml", ["quantize.holdout=0.1"]).quantize
    assert (q.n_fit, q.n_holdout) == (922, 102) and q.n_fit + q.n_holdout == q.n_calibration


@pytest.mark.parametrize("n_available", [50, 7])   # 7 < 16 images: a cycled stream
def test_held_out_positions_continue_the_calibration_stream(n_available):
    """Fitted (positions 0..11) and held-out (12..15) items are disjoint and together are exactly
    the stream of 16 positions, whatever the number of shards."""
    def items(n_shards, n_images, start=0):
        out = set()
        for shard in range(n_shards):
            idx, seeds = calibration_items(n_available, shard, n_shards, n_images, seed=3, start=start)
            out |= set(zip(idx.tolist(), seeds.tolist()))
        return out

    whole = items(1, 16)
    for n_shards in (1, 3):
        fitted, held = items(n_shards, 12), items(n_shards, 4, start=12)
        assert not fitted & held and fitted | held == whole and len(held) == 4
        assert fitted == items(1, 12)   # the fitted images are today's stream of 12


@pytest.mark.parametrize("name", ["paper", "hessian"])
def test_the_objective_under_the_fit_statistics_is_the_fits_own(name):
    """relative_objective under the statistics the codebook was fitted with gives back the fit's
    reported (last) objective: the held-out figure is the same quantity on other images."""
    cfg, adapter, teacher, plan = toy_setup()
    layer = plan.layer("conv2")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, teacher.conv2.in_channels, 8, 8, generator=gen)
    stats = (HessianStats if name == "hessian" else GramStats).empty(layer.geometry, layer.block_size, "conv2")
    stats.update(x)
    weight = get_submodule(teacher, "conv2").weight.detach()
    job = FitJob("conv2", weight, layer.geometry, stats.metric(), layer.n_centroids, layer.block_size, 0, name,
                 FitSettings(5))
    codebook = objective(name).fit(job)
    assert relative_objective(name, weight, layer.geometry, codebook, stats) == pytest.approx(
        codebook.objective[-1], rel=1e-6)
    assert relative_objective("weights", weight, layer.geometry, codebook, stats) is None


def test_a_run_reports_rank_and_the_held_out_objective(tmp_path, caplog):
    """holdout 0.25 of 8 images: 6 fitted, 2 held out. fc reads one 16-vector per image, so its
    Hessian has rank 6 of 16 (warned, naming the layer); every layer record and stage entry
    carries the held-out objective next to the fitted one."""
    caplog.set_level("WARNING", logger="bgd.runner")
    cfg = toy_config(quantize={**BASE["quantize"], "n_calibration": 8, "holdout": 0.25, "objective": "hessian",
                               "hessian": {"damp": "auto"}},
                     finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}})
    report = run(cfg, tmp_path, do_eval=False, progress=False)
    layers = {e["layer"]: e for e in events(tmp_path, "layer")}
    assert (layers["fc"]["rank"], layers["fc"]["dim"]) == (6, 16)
    assert layers["fc"]["damp"] == pytest.approx(0.01 * 16 / 6)
    assert "fc: rank 6 of 16 from 6 input rows" in caplog.text
    for e in layers.values():
        assert e["rank"] <= e["dim"] and e["objective_holdout"] >= 0
    fc_stage = next(s for s in report["stages"] if s["layers"] == ["fc"])
    assert fc_stage["objective_holdout"]["fc"] == layers["fc"]["objective_holdout"]
    assert fc_stage["objective"]["fc"] == layers["fc"]["objective_end"]
    # the fit's statistics are the 6 fitted images only
    assert load_stage_stats(tmp_path / "stages/2/stats.pt")["fc"].n_inputs == 6


def test_without_holdout_there_is_no_held_out_objective(tmp_path):
    cfg = toy_config(finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}})
    report = run(cfg, tmp_path, do_eval=False, progress=False)
    layers = events(tmp_path, "layer")
    assert all("objective_holdout" not in e and "rank" in e for e in layers)
    assert all("objective_holdout" not in s for s in report["stages"])
    assert load_stage_stats(tmp_path / "stages/2/stats.pt")["fc"].n_inputs == cfg.quantize.n_calibration
