"""The hessian objective: full input statistics, error feedback, exact codebook."""

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgd_dist.core.hessian import (block_factors, damped_cholesky, decode_matrix, error_feedback_assign,
                                   exact_codebook, fit_codebook_hessian, output_error, pooled_metric,
                                   relative_output_error)
from bgd_dist.core.kmeans import _nearest, fit_codebook
from bgd_dist.core.layouts import LayerGeometry, geometry_of, input_rows, weight_matrix
from bgd_dist.core.stats import GramStats, HessianStats, make_stats, merge_all, stats_from_state

from toy import toy_config


def correlated_inputs(n=24, c=16, hw=10, rank=4, seed=0):
    """Conv inputs whose channels are strongly correlated (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, rank, hw, hw, generator=g)
    mix = torch.randn(c, rank, generator=g)
    x = torch.einsum("nrhw,cr->nchw", base, mix) + 0.2 * torch.randn(n, c, hw, hw, generator=g)
    return F.avg_pool2d(x, 3, 1, 1)


GEOM = LayerGeometry("conv2d", (32, 16, 3, 3), padding=(1, 1))


def test_hessian_is_the_exact_output_error_of_a_conv():
    x = correlated_inputs()
    st = HessianStats.empty(GEOM, 9, "conv")
    st.update(x)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(GEOM.weight_shape, generator=g, dtype=torch.float64)
    w_hat = w + 0.1 * torch.randn(GEOM.weight_shape, generator=g, dtype=torch.float64)
    # tr(ΔW H ΔWᵀ) = Σ over output pixels of ||ΔW x||²: the real convolution with the difference
    direct = float(F.conv2d(x.double(), w - w_hat, padding=1).pow(2).sum())
    via_h = output_error(weight_matrix(w, GEOM), weight_matrix(w_hat, GEOM), st.hessian)
    assert via_h == pytest.approx(direct, rel=1e-10)
    rel = relative_output_error(w, w_hat, GEOM, st.metric())
    assert rel == pytest.approx(direct / float(F.conv2d(x.double(), w, padding=1).pow(2).sum()), rel=1e-10)


def test_hessian_streams_merges_round_trips_and_pools_to_the_paper_gram():
    x = correlated_inputs()
    whole = make_stats("hessian", GEOM, 9, "conv")
    whole.update(x)
    parts = []
    for xb in x.split(7):
        p = HessianStats.empty(GEOM, 9, "conv", max_rows=50)  # chunks smaller than one image
        p.update(xb)
        parts.append(stats_from_state(p.state()))
    merged = merge_all(parts)
    torch.testing.assert_close(merged.hessian, whole.hessian, rtol=1e-12, atol=1e-9)
    assert merged.n_inputs == whole.n_inputs == 24 * 100
    rows = torch.cat(list(input_rows(x, GEOM))).double()
    torch.testing.assert_close(whole.hessian, rows.T @ rows, rtol=1e-12, atol=1e-9)
    gram = GramStats.empty(GEOM, 9, "conv")
    gram.update(x)
    pooled = whole.pooled()
    torch.testing.assert_close(pooled.gram, gram.gram, rtol=1e-12, atol=1e-9)
    assert pooled.n_rows == gram.n_rows
    torch.testing.assert_close(pooled_metric(whole.metric(), 9), gram.metric(), rtol=1e-12, atol=1e-12)
    assert whole.nbytes == HessianStats.bytes_for(GEOM) == 144 * 144 * 8
    with pytest.raises(ValueError, match="conv"):
        whole.merge(HessianStats.empty(GEOM, 4, "conv"))
    with pytest.raises(ValueError, match="conv.*empty"):
        HessianStats.empty(GEOM, 9, "conv").metric()
    with pytest.raises(ValueError, match="conv.*non-finite"):
        whole.update(torch.full_like(x[:1], float("nan")))


def dense_normal_equations(w, h, assignments, k, d):
    """The exact centroid problem written out densely (tiny sizes only)."""
    n_rows, length = w.shape
    s = torch.zeros(n_rows * length, k * d, dtype=torch.float64)
    for i, a in enumerate(assignments.tolist()):
        j, r = divmod(i, n_rows)
        for t in range(d):
            s[r * length + j * d + t, a * d + t] = 1
    hb = torch.block_diag(*[h] * n_rows)
    return s.T @ hb @ s, s.T @ hb @ w.reshape(-1)


def test_exact_codebook_solves_the_least_squares_problem_and_never_increases_the_objective():
    geom = LayerGeometry("conv2d", (8, 4, 3, 3), padding=(1, 1))
    x = correlated_inputs(n=6, c=4, hw=6, rank=2)
    st = HessianStats.empty(geom, 9, "c")
    st.update(x)
    h = st.metric()
    w = weight_matrix(torch.randn(geom.weight_shape, generator=torch.Generator().manual_seed(0)), geom).double()
    k, d = 6, 9
    cb = fit_codebook(weight_matrix(w, geom).reshape(geom.weight_shape).float(), geom, pooled_metric(h, 9), k, d, 5)
    a = cb.assignments
    m, b = dense_normal_equations(w, h, a, k, d)
    best = torch.linalg.lstsq(m, b.unsqueeze(1)).solution.reshape(k, d)
    start = output_error(w, decode_matrix(cb.centroids.double(), a, 8), h)
    values = [output_error(w, decode_matrix(exact_codebook(w, h, cb.centroids, a, steps=s), a, 8), h)
              for s in (1, 2, 4, 8, 60)]
    assert all(v2 <= v1 * (1 + 1e-12) for v1, v2 in zip([start] + values, values))
    assert values[-1] == pytest.approx(output_error(w, decode_matrix(best, a, 8), h), rel=1e-9)
    assert values[-1] < 0.999 * start          # the cluster means were not optimal under H


def test_error_feedback_without_cross_terms_is_plain_nearest_assignment():
    # H block-diagonal with identical d x d blocks: no error to propagate, and the local metric
    # of every block is the damped block itself -> nearest centroid under it
    d, n_blocks, n_rows = 4, 5, 30
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    block = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)
    h = torch.block_diag(*[block] * n_blocks)
    w = torch.randn(n_rows, d * n_blocks, generator=g, dtype=torch.float64)
    c = torch.randn(7, d, generator=g, dtype=torch.float64)
    got = error_feedback_assign(w, c, damped_cholesky(h, 0.01), lazy=8)
    damped = block + 0.01 * float(h.diagonal().mean()) * torch.eye(d, dtype=torch.float64)
    subvectors = w.reshape(n_rows, n_blocks, d).transpose(0, 1).reshape(-1, d)
    assert torch.equal(got, _nearest(subvectors, c, damped))


def test_error_feedback_lowers_the_error_of_a_fixed_codebook_with_correlated_inputs():
    x = correlated_inputs()
    st = HessianStats.empty(GEOM, 9, "conv")
    st.update(x)
    h = st.metric()
    weight = torch.randn(GEOM.weight_shape, generator=torch.Generator().manual_seed(2))
    paper = fit_codebook(weight, GEOM, pooled_metric(h, 9), 64, 9, 20)
    w = weight_matrix(weight, GEOM).double()
    c = paper.centroids.double()
    a_ef = error_feedback_assign(w, c, damped_cholesky(h, 0.01))
    err_paper = output_error(w, decode_matrix(c, paper.assignments, 32), h)
    err_ef = output_error(w, decode_matrix(c, a_ef, 32), h)
    assert err_ef < 0.8 * err_paper
    # lazy windows are a schedule, not a different algorithm
    assert torch.equal(a_ef, error_feedback_assign(w, c, damped_cholesky(h, 0.01), lazy=9))


def test_fit_codebook_hessian_beats_the_paper_at_the_same_size_on_held_out_inputs():
    x = correlated_inputs(n=40)
    fit_st, held_st = HessianStats.empty(GEOM, 9, "conv"), HessianStats.empty(GEOM, 9, "conv")
    fit_st.update(x[:28])
    held_st.update(x[28:])
    weight = torch.randn(GEOM.weight_shape, generator=torch.Generator().manual_seed(3))
    paper = fit_codebook(weight, GEOM, fit_st.pooled().metric(), 64, 9, 30, seed=1)
    hess = fit_codebook_hessian(weight, GEOM, fit_st.metric(), 64, 9, 30, seed=1, rounds=3, cg_steps=10)
    assert hess.centroids.shape == (64, 9) and hess.assignments.shape == paper.assignments.shape
    assert hess.centroids.dtype == weight.dtype
    objective = hess.objective
    assert len(objective) == 2 + 3
    assert all(b <= a for a, b in zip(objective, objective[1:]))
    # the first value is the paper's codebook under H (same init, same seed)
    assert objective[0] == pytest.approx(relative_output_error(weight, paper.decode(GEOM), GEOM, fit_st.metric()))
    assert objective[-1] == pytest.approx(relative_output_error(weight, hess.decode(GEOM), GEOM, fit_st.metric()),
                                          rel=1e-5)
    held_paper = relative_output_error(weight, paper.decode(GEOM), GEOM, held_st.metric())
    held_hess = relative_output_error(weight, hess.decode(GEOM), GEOM, held_st.metric())
    assert held_hess < 0.75 * held_paper


def test_fit_codebook_hessian_handles_degenerate_statistics_and_bad_input():
    lin = geometry_of(nn.Linear(8, 6))
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    # one input feature is always zero: H is singular; damping keeps the factorisation alive
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    x[:, 3] = 0
    st = HessianStats.empty(lin, 2, "fc")
    st.update(x)
    cb = fit_codebook_hessian(w, lin, st.metric(), 4, 2, 5)
    assert torch.isfinite(cb.centroids).all()
    # no input ever reaches the layer: every codebook is exact, the weights-only fit is kept
    zero = fit_codebook_hessian(w, lin, torch.zeros(8, 8), 4, 2, 5)
    assert zero.objective == (0.0, 0.0)
    torch.testing.assert_close(zero.centroids, fit_codebook(w, lin, None, 4, 2, 5).centroids)
    with pytest.raises(ValueError, match="fc.*hessian shape"):
        fit_codebook_hessian(w, lin, torch.eye(4), 4, 2, 5, name="fc")
    with pytest.raises(ValueError, match="fc.*NaN"):
        fit_codebook_hessian(w, lin, torch.full((8, 8), float("nan")), 4, 2, 5, name="fc")
    with pytest.raises(ValueError, match="fc.*damp"):
        fit_codebook_hessian(w, lin, torch.eye(8), 4, 2, 5, name="fc", damp=0)


def test_a_run_with_the_hessian_objective_and_the_size_fallback(tmp_path, caplog):
    from bgd_dist.runner import load_stage_stats, run

    # conv2/conv3 (3x3, L = 72) use H; with max_mb below their H size they fall back to the Gram
    cfg = toy_config(quantize={"objective": "hessian", "hessian": {"rounds": 1, "cg_steps": 3}, "keep_stats": "full"},
                     finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}})
    report = run(cfg, tmp_path / "h", progress=False, do_eval=False)
    stats = load_stage_stats(tmp_path / "h" / "stages" / "0" / "stats.pt")
    assert {type(s).__name__ for s in stats.values()} == {"HessianStats"}
    assert report["stages"][0]["stats_kinds"] == ["hessian"]
    assert report["stages"][0]["stats_memory_bytes"] == sum(s.nbytes for s in stats.values())
    # by default a Hessian run keeps only the pooled Gram of each layer (what the paper objective uses):
    # the same codebooks, a run directory as small as a paper run's
    pooled = run(dataclasses.replace(cfg, quantize=dataclasses.replace(cfg.quantize, keep_stats="pooled")),
                 tmp_path / "p", progress=False, do_eval=False)
    kept = load_stage_stats(tmp_path / "p" / "stages" / "0" / "stats.pt")
    assert {type(s).__name__ for s in kept.values()} == {"GramStats"}
    for name, full in stats.items():
        assert torch.equal(kept[name].gram, full.pooled().gram)
    from bgd_dist.fileformat import load_compressed
    a, b = (load_compressed(tmp_path / d / "model.bgd").state_dict() for d in ("p", "h"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pooled["stages"][0]["stats_file_bytes"] * 10 < report["stages"][0]["stats_file_bytes"]
    assert pooled["run_dir_bytes"] < report["run_dir_bytes"]
    records = [json.loads(line) for line in open(tmp_path / "h" / "log.jsonl")]
    fitted = {r["layer"]: r["objective"] for r in records if r["event"] == "layer"}
    # the toy's conv3 is a grouped convolution: it falls back to the paper objective, with a record
    assert fitted == {"conv2": "hessian", "conv3": "paper", "shortcut": "hessian", "fc": "hessian"}
    assert [r["layer"] for r in records if r["event"] == "hessian_fallback"] == ["conv3"]
    small = toy_config(quantize={"objective": "hessian", "hessian": {"max_mb": 0.01}},
                       finetune={"layerwise": {"enabled": False}, "global": {"enabled": False}})
    with caplog.at_level(logging.WARNING, logger="bgd.runner"):
        run(small, tmp_path / "f", progress=False, do_eval=False)
    assert any("exceeds quantize.hessian.max_mb" in r.getMessage() and "conv2" in r.getMessage()
               for r in caplog.records)
    stats = load_stage_stats(tmp_path / "f" / "stages" / "0" / "stats.pt")
    assert {type(s).__name__ for s in stats.values()} == {"GramStats"}


def test_bgd_quantize_objective_flag(tmp_path):
    from bgd_dist.cli import main
    from bgd_dist.runner import load_stage_stats

    path = tmp_path / "toy.yaml"
    path.write_text(toy_config(quantize={"hessian": {"rounds": 1, "cg_steps": 2}, "keep_stats": "full"}).to_yaml())
    out = tmp_path / "run"
    assert main(["quantize", str(path), "--objective", "hessian", "--executor", "serial", "--skip-layerwise",
                 "--skip-global", "--no-eval", "--no-progress", "--out", str(out)]) == 0
    assert "objective: hessian" in (out / "config.yaml").read_text()
    assert type(load_stage_stats(out / "stages" / "0" / "stats.pt")["conv2"]).__name__ == "HessianStats"


def test_hessian_is_the_exact_output_error_of_linear_and_non_overlapping_transposed_layers():
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 1, 8)          # channels of very different scales, correlated
    base = torch.randn(6, 2, 5, 5, generator=g)
    x = torch.einsum("nrhw,cr->nchw", base, torch.randn(8, 2, generator=g)) * scales[None, :, None, None]
    for module, inputs, run in [
        (nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False), x, lambda m, w, i: F.conv_transpose2d(i, w, stride=2)),
        (nn.Linear(8, 12, bias=False), x.permute(0, 2, 3, 1).reshape(-1, 8), lambda m, w, i: F.linear(i, w)),
    ]:
        geom = geometry_of(module)
        st = HessianStats.empty(geom, 4, "m")
        st.update(inputs)
        w = module.weight.detach().double()
        w_hat = w + 0.05 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        direct = float(run(module, w - w_hat, inputs.double()).pow(2).sum())
        assert output_error(weight_matrix(w, geom), weight_matrix(w_hat, geom), st.hessian) == \
            pytest.approx(direct, rel=1e-9)
        # and the hessian fit beats the paper's codebook of the same size under that error
        k = 8
        paper = fit_codebook(module.weight.detach(), geom, st.pooled().metric(), k, 4, 10)
        hess = fit_codebook_hessian(module.weight.detach(), geom, st.metric(), k, 4, 10, rounds=2, cg_steps=5)
        err = lambda cb: relative_output_error(module.weight.detach(), cb.decode(geom), geom, st.metric())
        assert err(hess) < 0.9 * err(paper)


def test_grouped_convolutions_are_refused_by_the_full_statistics_and_fall_back_in_a_run(tmp_path):
    depthwise = geometry_of(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    with pytest.raises(ValueError, match="dw.*groups = 1"):
        HessianStats.empty(depthwise, 9, "dw")
    with pytest.raises(ValueError, match="dw.*groups = 1"):
        fit_codebook_hessian(torch.randn(8, 1, 3, 3), depthwise, torch.eye(9), 4, 9, 2, name="dw")
    from bgd_dist.plan import LayerPlan
    from bgd_dist.config import HessianConfig
    from bgd_dist.objectives import resolve

    layer = LayerPlan("dw", depthwise, False, 9, 4, 4, "hessian")
    used, why = resolve(layer, HessianConfig())
    assert used.stats == "gram"
    assert "grouped convolution" in why


def test_zero_weights_and_a_zero_output_do_not_break_the_hessian_fit():
    lin = geometry_of(nn.Linear(8, 6))
    h = torch.eye(8, dtype=torch.float64)
    cb = fit_codebook_hessian(torch.zeros(6, 8), lin, h, 4, 2, 3)
    assert cb.objective == (0.0, 0.0) and torch.equal(cb.decode(lin), torch.zeros(6, 8))
    # weights only where the inputs never vary: the output is zero, so is the error
    h2 = torch.diag(torch.tensor([0.0, 0, 1, 1, 1, 1, 1, 1], dtype=torch.float64))
    w = torch.zeros(6, 8)
    w[:, :2] = torch.randn(6, 2)
    assert fit_codebook_hessian(w, lin, h2, 4, 2, 3).objective == (0.0, 0.0)


def test_a_stage_whose_hessians_exceed_max_mb_is_collected_in_several_passes():
    from bgd_dist.messages import LayerRequest
    from bgd_dist.runner import collect_groups

    g = LayerGeometry("conv2d", (8, 8, 3, 3))          # H = 72 x 72 x 8 bytes = 41472
    layers = [LayerRequest("a", g, 9, "hessian"), LayerRequest("b", g, 9, "gram"), LayerRequest("c", g, 9, "hessian"),
              LayerRequest("d", g, 9, "hessian")]
    assert collect_groups(layers, 1e9) == [layers]
    passes = collect_groups(layers, 50000)
    assert [[l.name for l in p] for p in passes] == [["a", "b"], ["c"], ["d"]]
    assert collect_groups(layers, 10) == [[layers[0], layers[1]], [layers[2]], [layers[3]]]   # one H each at least


def damped_inverse_cholesky(hessian, damp):
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹``: ``U = V⁻¹`` with ``V`` of ``damped_cholesky``
    (the fit works with ``V`` and never forms ``U``; the relation is checked here)."""
    upper = damped_cholesky(hessian, damp)
    eye = torch.eye(upper.shape[0], dtype=upper.dtype, device=upper.device)
    return torch.linalg.solve_triangular(upper, eye, upper=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_damped_inverse_cholesky_and_block_factors(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 36, generator=g, dtype=torch.float64)        # rank 30 < 36: damping needed
    h = (x.T @ x).to(dtype)
    upper = damped_inverse_cholesky(h, 0.01)
    assert upper.dtype == dtype and torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    lam = 0.01 * float(h.double().diagonal().mean())
    expected = torch.linalg.inv(h.double() + lam * torch.eye(36, dtype=torch.float64))
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close((upper.T @ upper).double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    factors = block_factors(upper, 4)
    for j in range(9):
        blk = upper[4 * j:4 * j + 4, 4 * j:4 * j + 4]
        torch.testing.assert_close(factors[j] @ blk, torch.eye(4, dtype=dtype), rtol=tol, atol=tol)


def test_rounds_stop_when_the_objective_stalls():
    x = correlated_inputs(n=30)
    st = HessianStats.empty(GEOM, 9, "conv")
    st.update(x)
    weight = torch.randn(GEOM.weight_shape, generator=torch.Generator().manual_seed(5))
    full = fit_codebook_hessian(weight, GEOM, st.metric(), 32, 9, 30, seed=0, rounds=5, stall=0.0)
    # stall = 0: the rounds go on while they gain anything at all
    assert len(full.objective) > 2 + 1
    assert len(full.objective) == 2 + 5 or full.objective[-1] == full.objective[-2]
    short = fit_codebook_hessian(weight, GEOM, st.metric(), 32, 9, 30, seed=0, rounds=5, stall=0.9)
    assert len(short.objective) == 2 + 1                              # no round gains 90%
    assert short.objective[0] == pytest.approx(full.objective[0], rel=1e-9)   # the same paper fit
    # (which of the two ends lower is a matter of the path: the fit is not convex in the assignments)
    assert all(b <= a for a, b in zip(short.objective, short.objective[1:]))
    for cb in (full, short):
        assert cb.objective[-1] == pytest.approx(
            relative_output_error(weight, cb.decode(GEOM), GEOM, st.metric()), rel=1e-5)
    with pytest.raises(ValueError, match="stall"):
        fit_codebook_hessian(weight, GEOM, st.metric(), 32, 9, 10, stall=-1.0)


def test_symmetrized_factored_products_and_error_feedback_identities():
    from bgd_dist.core.hessian import _Factored, _damped_cholesky, _error_feedback, _symmetrized, _times_upper
    g = torch.Generator().manual_seed(6)
    m = torch.randn(37, 37, generator=g, dtype=torch.float64)
    sym, finite = _symmetrized(m, tile=8)                            # tiles that do not divide 37
    assert finite and torch.equal(sym, (m + m.T) / 2)
    m[3, 30] = float("nan")
    assert not _symmetrized(m, tile=8)[1]
    x = torch.randn(40, 48, generator=g, dtype=torch.float64)
    h = x.T @ x / 40                                                 # rank 40 < 48
    chol, lam = _damped_cholesky(h, 0.01)
    assert torch.equal(chol, chol.triu())
    torch.testing.assert_close(chol @ chol.T, h + lam * torch.eye(48, dtype=torch.float64))
    y = torch.randn(5, 48, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_times_upper(y, chol, block=7), y @ chol)
    op = _Factored(chol.float(), lam)
    state, value = op.quad(y)
    assert value == pytest.approx(float(((y @ h) * y).sum()), rel=1e-4)
    torch.testing.assert_close(op.finish(y, state), y @ h, rtol=1e-4, atol=1e-4)
    # the pass returns D = W - Q and E = D V, whence D H = E Vᵀ - λD and tr(D H Dᵀ) = ||E||² - λ||D||²
    w = torch.randn(6, 48, generator=g, dtype=torch.float64)
    c = torch.randn(5, 4, generator=g, dtype=torch.float64)
    a, err, diff = _error_feedback(w, c, chol, lazy=8)
    assert torch.equal(a, error_feedback_assign(w, c, chol, lazy=8))
    torch.testing.assert_close(diff, w - decode_matrix(c, a, 6))
    torch.testing.assert_close(err, diff @ chol)
    assert float((err ** 2).sum() - lam * (diff ** 2).sum()) == pytest.approx(output_error(w, w - diff, h), rel=1e-9)


def test_long_rows_shorten_the_refinement_and_the_fit_is_deterministic():
    # a linear layer whose rows are long next to n_iter * K: a product with H costs more than a
    # third of the paper fit, so at most 2 rounds run and the first starts from the paper's codebook
    lin = LayerGeometry("linear", (24, 96))
    g = torch.Generator().manual_seed(7)
    x = torch.relu(torch.randn(200, 8, generator=g) @ torch.randn(8, 96, generator=g) + 0.3 * torch.randn(200, 96, generator=g))
    h = (x.T @ x).double() / 200
    weight = torch.randn(24, 96, generator=g)
    runs = [fit_codebook_hessian(weight, lin, h, 16, 4, 5, seed=0, rounds=4, stall=0.0) for _ in range(2)]
    cb = runs[0]
    assert torch.equal(cb.centroids, runs[1].centroids) and torch.equal(cb.assignments, runs[1].assignments)
    assert cb.objective == runs[1].objective
    assert len(cb.objective) == 2 + 2 and cb.objective[1] == cb.objective[0]
    assert all(b <= a for a, b in zip(cb.objective, cb.objective[1:]))
    assert cb.objective[-1] < 0.9 * cb.objective[0]
    assert cb.objective[-1] == pytest.approx(relative_output_error(weight, cb.decode(lin), lin, h), rel=1e-4)
    # enough EM iterations to pay for the products: the full schedule
    full = fit_codebook_hessian(weight, lin, h, 16, 4, 20, seed=0, rounds=4, stall=0.0)
    assert len(full.objective) > 2 + 2 and full.objective[1] < full.objective[0]
