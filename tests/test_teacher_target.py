"""quantize.hessian.target: teacher — fitting a layer to reproduce the teacher's outputs from the
student's inputs (statistics paired call by call, the target weight W*, the driver's fallbacks)."""

import json

import pytest
import torch
import torch.nn.functional as F

from bgd_dist.config import ConfigError, load_pipeline
from bgd_dist.core.hessian import TARGET_DAMPS
from bgd_dist.core.layouts import LayerGeometry, weight_matrix
from bgd_dist.core.stats import TeacherTargetStats, stats_from_state
from bgd_dist.messages import LayerRequest
from bgd_dist.runner import collect_groups, run

from toy import BASE, toy_config

pytestmark = pytest.mark.usefixtures("one_thread")

LINEAR = LayerGeometry("linear", (5, 12))
CONV = LayerGeometry("conv2d", (4, 3, 3, 3), padding=(1, 1))


def pair(shape, noise=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x + noise * torch.randn(*shape, generator=gen, dtype=torch.float64), x   # (student, teacher)


def stats_of(geometry, batches, block_size=4):
    s = TeacherTargetStats.empty(geometry, block_size)
    for x_s, x_t in batches:
        s.update_pair(x_s, x_t)
    return s


def test_where_the_inputs_agree_the_target_is_the_weight_itself():
    x, _ = pair((64, 12))
    s = stats_of(LINEAR, [(x, x)])
    w = torch.randn(5, 12, dtype=torch.float64)
    assert torch.equal(s.target_weight(w, 0.01), w)
    assert s.input_error == 0.0


def test_the_target_is_the_least_squares_map_from_student_to_teacher_outputs():
    x_s, x_t = pair((200, 12))
    s = stats_of(LINEAR, [(x_s[:120], x_t[:120]), (x_s[120:], x_t[120:])])
    w = torch.randn(5, 12, dtype=torch.float64)
    target = s.target_weight(w, 1e-12)
    lstsq = torch.linalg.lstsq(x_s, x_t @ w.T).solution.T
    assert torch.allclose(target, lstsq, atol=1e-8)
    assert s.input_error == pytest.approx(float((x_t - x_s).pow(2).sum() / x_t.pow(2).sum()))


def test_the_fit_objective_equals_the_teacher_output_error_up_to_a_constant_conv2d():
    """For any Ŵ: Σ||conv(x̃, Ŵ) - conv(x, W)||² = tr((Ŵ - W*) H (Ŵ - W*)ᵀ) + const (rows paired
    through the im2col layout, several images per update)."""
    x_s, x_t = pair((3, 3, 6, 6))
    s = stats_of(CONV, [(x_s[:2], x_t[:2]), (x_s[2:], x_t[2:])], block_size=9)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    target = s.target_weight(weight_matrix(w, CONV), 1e-12)
    gaps = []
    for seed in (1, 2, 3):
        w_hat = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out_err = float((F.conv2d(x_s, w_hat, padding=1) - F.conv2d(x_t, w, padding=1)).pow(2).sum())
        diff = weight_matrix(w_hat, CONV) - target
        gaps.append(out_err - float(((diff @ s.hessian) * diff).sum()))
    assert gaps[0] == pytest.approx(gaps[1], rel=1e-9) and gaps[1] == pytest.approx(gaps[2], rel=1e-9)


def test_a_larger_target_damping_keeps_the_target_nearer_the_weight():
    """``W*`` is the ridge solution pulled toward ``W``: with fewer rows than inputs the least-squares
    map fits the calibration rows' noise; the shift shrinks as the damping grows, and vanishes in the limit."""
    x_s, x_t = pair((8, 12), noise=0.5)
    s = stats_of(LINEAR, [(x_s, x_t)])
    w = torch.randn(5, 12, dtype=torch.float64)
    shifts = [float((s.target_weight(w, damp) - w).norm()) for damp in (0.01, 0.1, 1.0, 1e6)]
    assert shifts == sorted(shifts, reverse=True) and shifts[0] > 2 * shifts[2] and shifts[-1] < 1e-4 * shifts[0]


def test_auto_damping_picks_the_target_with_the_smallest_held_out_output_error():
    """Few fitted rows (fewer than inputs) and many held-out ones: of ``W`` and the ``W*`` of every
    damp, the chosen one reproduces the teacher's held-out outputs best, measured on the rows."""
    x_s, x_t = pair((208, 12), noise=0.5)
    fit, held = stats_of(LINEAR, [(x_s[:8], x_t[:8])]), stats_of(LINEAR, [(x_s[8:], x_t[8:])])
    w = torch.randn(5, 12, dtype=torch.float64)
    damp, target = fit.select_target(w, held)
    candidates = {None: w, **{d: fit.target_weight(w, d) for d in TARGET_DAMPS}}
    errors = {d: float((x_s[8:] @ v.T - x_t[8:] @ w.T).pow(2).sum()) for d, v in candidates.items()}
    assert damp == min(errors, key=errors.get)
    assert torch.allclose(target, candidates[damp], atol=1e-8)
    # on the fitted rows themselves the least damped W* wins (the ridge's training error grows with the damp)
    assert fit.select_target(w, fit)[0] == min(TARGET_DAMPS)


def test_auto_damping_keeps_the_weight_where_the_held_out_inputs_agree():
    x_s, x_t = pair((64, 12))
    fit, held = stats_of(LINEAR, [(x_s, x_t)]), stats_of(LINEAR, [(x_t, x_t)])
    w = torch.randn(5, 12, dtype=torch.float64)
    damp, target = fit.select_target(w, held)
    assert damp is None and torch.equal(target, w)


def test_statistics_merge_and_cross_processes_as_plain_data():
    x_s, x_t = pair((40, 12))
    whole = stats_of(LINEAR, [(x_s, x_t)])
    merged = stats_of(LINEAR, [(x_s[:15], x_t[:15])]).merge(stats_of(LINEAR, [(x_s[15:], x_t[15:])]))
    back = stats_from_state(merged.state())
    assert isinstance(back, TeacherTargetStats)
    for s in (merged, back):
        assert torch.allclose(s.hessian, whole.hessian) and torch.allclose(s.cross, whole.cross)
        assert (s.n_inputs, s.aligned) == (40, True) and s.input_sq == pytest.approx(whole.input_sq)
    assert back.pooled().name == "gram"   # keep_stats: pooled reduces it like a Hessian


def test_rows_that_do_not_pair_keep_the_weights_target():
    x_s, x_t = pair((30, 12))
    s = stats_of(LINEAR, [(x_s, x_t[:20])])          # e.g. region features of different proposals
    w = torch.randn(5, 12, dtype=torch.float64)
    assert not s.aligned and s.input_error is None and torch.equal(s.target_weight(w, 0.01), w)
    assert s.n_inputs == 30                           # H of the student's inputs is still collected
    assert not stats_of(LINEAR, [(x_s, x_t)]).merge(s).aligned
    missing = TeacherTargetStats.empty(LINEAR, 4)
    missing.update_pair(x_s, None)                    # a call the teacher did not make
    assert not missing.aligned
    with pytest.raises(TypeError, match="teacher's input"):
        missing.update(x_s)


def test_the_paired_statistics_count_twice_against_the_memory_bound():
    big = LayerGeometry("linear", (4, 1024))          # one 8 MB float64 matrix
    reqs = [LayerRequest(f"l{i}", big, 4, kind) for i, kind in enumerate(["hessian", "hessian_teacher", "hessian"])]
    assert [len(g) for g in collect_groups(reqs, 17 * 2 ** 20)] == [1, 1, 1]   # 8 | 16 | 8 MB
    assert [len(g) for g in collect_groups(reqs, 24 * 2 ** 20)] == [2, 1]      # 8 + 16 | 8 MB


def test_target_and_its_bound_are_validated_by_name():
    assert load_pipeline("pipelines/digits.yaml").quantize.hessian.target == "weights"
    with pytest.raises(ConfigError, match="target: unknown value 'student'"):
        load_pipeline("pipelines/digits.yaml", ["quantize.hessian.target=student"])
    with pytest.raises(ConfigError, match="max_input_error: must be >= 0"):
        load_pipeline("pipelines/digits.yaml", ["quantize.hessian.max_input_error=-1"])
    with pytest.raises(ConfigError, match="target_damp: must be > 0"):
        load_pipeline("pipelines/digits.yaml", ["quantize.hessian.target_damp=0"])
    with pytest.raises(ConfigError, match="target_damp: expected a number > 0, auto or null, got 'best'"):
        load_pipeline("pipelines/digits.yaml", ["quantize.hessian.target_damp=best"])
    with pytest.raises(ConfigError, match="target_damp: auto chooses on held-out images; set quantize.holdout > 0"):
        load_pipeline("pipelines/digits.yaml", ["quantize.hessian.target_damp=auto"])
    with pytest.raises(ConfigError, match=r"teacher_match: 'layer\(' is not a valid regular expression"):
        load_pipeline("pipelines/digits.yaml", ["quantize.hessian.teacher_match=layer("])


def layer_events(out):
    return {e["layer"]: e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if e["event"] == "layer"}


def test_a_run_fits_later_stages_to_the_teacher_and_is_closer_to_it(tmp_path):
    """The first stage sees the teacher's own inputs (input error 0: the target is the weight
    itself); later stages see the quantized stages' errors and are fitted to the teacher's
    outputs, which brings the student's output closer to the teacher's than the weights target."""
    from bgd_dist import load_compressed
    from bgd_dist.adapters import make_adapter

    no_ft = {"layerwise": {"enabled": False}, "global": {"enabled": False}}
    gaps = {}
    for target in ("weights", "teacher"):
        cfg = toy_config(quantize={**BASE["quantize"], "objective": "hessian",
                                   "hessian": {"target": target, "max_input_error": 10.0}}, finetune=no_ft)
        out = tmp_path / target
        run(cfg, out, do_eval=False, progress=False)
        events = sorted((e for e in layer_events(out).values() if e["objective"] == "hessian"),
                        key=lambda e: e["stage"])
        if target == "teacher":
            first = [e for e in events if e["stage"] == events[0]["stage"]]
            later = [e for e in events if e["stage"] > events[0]["stage"]]
            assert later and all(e["input_error"] == 0.0 and e["target_shift"] == 0.0 for e in first)
            assert all(e["input_error"] > 0 and e["target_shift"] > 0 and e["target"] == "teacher" for e in later)
        else:
            assert all("input_error" not in e for e in events)
        adapter = make_adapter(cfg.model, cfg.data)
        teacher = adapter.build_model().eval()
        student = load_compressed(out / "model.bgd", model=adapter.fresh_model()).eval()
        x = next(iter(adapter.eval_batches(0, 1, 64)))
        with torch.no_grad():
            gaps[target] = float((student(x) - teacher(x)).pow(2).mean())
    assert gaps["teacher"] < gaps["weights"]


def test_a_layer_above_the_input_error_bound_keeps_the_weights_target(tmp_path, caplog):
    cfg = toy_config(quantize={**BASE["quantize"], "objective": "hessian",
                               "hessian": {"target": "teacher", "max_input_error": 0.0}},
                     finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}})
    run(cfg, tmp_path, do_eval=False, progress=False)
    events = [e for e in layer_events(tmp_path).values() if e["objective"] == "hessian"]
    assert {e["target"] for e in events if e["input_error"] > 0} == {"weights"}
    assert {e["target"] for e in events if e["input_error"] == 0} == {"teacher"}
    assert "exceeds quantize.hessian.max_input_error = 0" in caplog.text


def test_teacher_match_limits_the_teacher_target_to_the_layers_it_names(tmp_path):
    cfg = toy_config(quantize={**BASE["quantize"], "objective": "hessian",
                               "hessian": {"target": "teacher", "teacher_match": "shortcut|fc", "max_input_error": 10}},
                     finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}})
    run(cfg, tmp_path, do_eval=False, progress=False)
    paired = {n for n, e in layer_events(tmp_path).items() if "input_error" in e}
    assert paired == {"shortcut", "fc"}


def test_auto_damping_chooses_per_layer_on_the_held_out_images(tmp_path):
    cfg = toy_config(quantize={**BASE["quantize"], "objective": "hessian", "holdout": 0.25,
                               "hessian": {"target": "teacher", "target_damp": "auto", "max_input_error": 10}},
                     finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}})
    run(cfg, tmp_path, do_eval=False, progress=False)
    events = [e for e in layer_events(tmp_path).values() if "input_error" in e]
    assert events and {e["target_damp"] for e in events} <= {None, *TARGET_DAMPS}
    # W itself exactly where the inputs agree (the first stage); the others chose on the held-out rows
    assert all(e["target"] == "weights" and e["target_damp"] is None for e in events if e["input_error"] == 0)
    assert any(e["target"] == "teacher" and e["target_shift"] > 0 for e in events if e["input_error"] > 0)
