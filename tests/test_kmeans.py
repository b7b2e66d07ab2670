"""k-means under the Gram metric (METHOD.md §2): properties in the style of faiss' clustering tests."""

import time
import warnings

import pytest
import torch

from bgd_dist.core import kmeans
from bgd_dist.core.kmeans import (
    _argmin_rows,
    _distinct_rows,
    _hartigan_moves,
    clamp_n_centroids,
    fit_codebook,
    relative_error,
)
from bgd_dist.core.layouts import LayerGeometry, to_subvectors


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _gram(block_size, seed=0, rank=None, dtype=torch.float64):
    """A PSD metric like a layer's: Gram of correlated activations."""
    gen = _gen(seed)
    mix = torch.randn(block_size, block_size, generator=gen, dtype=dtype)
    x = torch.randn(400, rank or block_size, generator=gen, dtype=dtype)
    if rank is not None:
        x = x @ torch.randn(rank, block_size, generator=gen, dtype=dtype)
    else:
        x = x @ mix
    return x.T @ x / x.shape[0]


CONV = LayerGeometry("conv2d", (32, 16, 3, 3))           # d = 9 -> 512 subvectors


def _weight(geometry=CONV, seed=0, dtype=torch.float32):
    return torch.randn(geometry.weight_shape, generator=_gen(seed), dtype=dtype)


def _objective(weight, geometry, codebook, metric, block_size):
    """Relative objective recomputed from scratch in float64."""
    w = to_subvectors(weight, geometry, block_size).double()
    m = metric.double() if metric is not None else torch.eye(block_size, dtype=torch.float64)
    diff = w - codebook.centroids.double()[codebook.assignments]
    return float(((diff @ m) * diff).sum() / ((w @ m) * w).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric_kind", ["gram", "identity", "rank_deficient"])
@pytest.mark.parametrize("init", ["random", "kmeans++"])
@pytest.mark.parametrize("refine", ["hartigan", "lloyd"])
def test_objective_never_increases(seed, metric_kind, init, refine):
    metric = {"gram": _gram(9, seed), "identity": None, "rank_deficient": _gram(9, seed, rank=4)}[metric_kind]
    weight = _weight(seed=seed)
    cb = fit_codebook(weight, CONV, metric, 32, 9, n_iter=30, init=init, seed=seed, refine=refine)
    obj = cb.objective
    assert len(obj) == 31
    for before, after in zip(obj, obj[1:]):
        assert after <= before + 1e-12 * obj[0], obj
    assert obj[-1] < obj[0]
    assert 0 < obj[-1] < 1
    # the reported objective is the objective of the returned codebook
    assert obj[-1] == pytest.approx(_objective(weight, CONV, cb, metric, 9), rel=1e-9)
    assert cb.centroids.shape == (32, 9) and cb.centroids.dtype == weight.dtype
    assert cb.assignments.shape == (CONV.n_subvectors(9),) and cb.assignments.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("refine", ["hartigan", "lloyd"])
def test_objective_never_increases_on_larger_layer(dtype, refine):
    geometry = LayerGeometry("conv2d", (128, 64, 3, 3))  # 8192 subvectors, chunked E-step
    weight = _weight(geometry, seed=4, dtype=dtype)
    cb = fit_codebook(weight, geometry, _gram(9, 4), 256, 9, n_iter=15, seed=4, refine=refine)
    obj = cb.objective
    assert all(b <= a + 1e-12 * obj[0] for a, b in zip(obj, obj[1:])), obj
    assert obj[-1] == pytest.approx(_objective(weight, geometry, cb, _gram(9, 4), 9), rel=1e-9)


def test_more_centroids_give_lower_objective():
    weight = _weight(seed=3)
    metric = _gram(9, 3)
    finals = [fit_codebook(weight, CONV, metric, k, 9, n_iter=25, init="kmeans++", seed=0).objective[-1]
              for k in (2, 8, 32, 128)]
    assert finals == sorted(finals, reverse=True) and len(set(finals)) == 4, finals


@pytest.mark.parametrize("refine", ["hartigan", "lloyd"])
def test_seed_determines_the_codebook(refine):
    weight, metric = _weight(seed=5), _gram(9, 5)
    for init in ("random", "kmeans++"):
        a = fit_codebook(weight, CONV, metric, 16, 9, n_iter=10, init=init, seed=7, refine=refine)
        b = fit_codebook(weight, CONV, metric, 16, 9, n_iter=10, init=init, seed=7, refine=refine)
        c = fit_codebook(weight, CONV, metric, 16, 9, n_iter=10, init=init, seed=8, refine=refine)
        assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
        assert a.objective == b.objective
        assert not torch.equal(a.centroids, c.centroids)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_float32_and_float64_agree_on_well_separated_data(seed):
    gen = _gen(11)
    geometry = LayerGeometry("linear", (64, 32))            # d = 4 -> 512 subvectors
    centers = 10 * torch.randn(8, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(8, (512,), generator=gen)
    sub = centers[labels] + 0.01 * torch.randn(512, 4, generator=gen, dtype=torch.float64)
    weight64 = sub.reshape(8, 64, 4).transpose(0, 1).reshape(64, 32)   # block-major inverse
    assert torch.equal(to_subvectors(weight64, geometry, 4), sub)
    metric = _gram(4, 11)
    cb64 = fit_codebook(weight64, geometry, metric, 8, 4, n_iter=20, init="kmeans++", seed=seed)
    cb32 = fit_codebook(weight64.float(), geometry, metric, 8, 4, n_iter=20, init="kmeans++", seed=seed)
    assert cb64.objective[-1] < 1e-4                        # found the 8 true clusters
    assert torch.equal(cb64.assignments, cb32.assignments)
    assert cb32.objective[-1] == pytest.approx(cb64.objective[-1], rel=1e-4)
    torch.testing.assert_close(cb32.centroids.double(), cb64.centroids, rtol=1e-5, atol=1e-5)


def test_more_centroids_than_distinct_subvectors_warns_and_is_exact():
    gen = _gen(2)
    geometry = LayerGeometry("conv2d", (12, 4, 1, 1))       # d = 2 -> 24 subvectors
    distinct = torch.randn(5, 2, generator=gen)
    sub = distinct[torch.arange(24) % 5]
    weight = sub.reshape(2, 12, 2).transpose(0, 1).reshape(12, 4, 1, 1)
    for init in ("random", "kmeans++"):
        for metric in (None, _gram(2, 1)):
            with pytest.warns(UserWarning, match="5 distinct"):
                cb = fit_codebook(weight, geometry, metric, 16, 2, n_iter=10, init=init, name="tiny")
            assert cb.centroids.shape == (16, 2)
            assert int(cb.assignments.min()) >= 0 and int(cb.assignments.max()) < 16
            assert torch.equal(cb.decode(geometry), weight)
            assert cb.objective[-1] == 0.0


@pytest.mark.parametrize("case", ["all_zero", "duplicates", "depthwise", "zero_metric"])
def test_degenerate_layers_terminate(case):
    geometry = CONV
    metric = _gram(9, 0)
    k = 16
    if case == "all_zero":
        weight = torch.zeros(CONV.weight_shape)
    elif case == "duplicates":
        base = torch.randn(3, 9, generator=_gen(0))
        sub = torch.cat([base[torch.arange(500) % 3], torch.randn(12, 9, generator=_gen(1))])
        weight = sub.reshape(16, 32, 9).transpose(0, 1).reshape(CONV.weight_shape)
    elif case == "depthwise":
        geometry = LayerGeometry("conv2d", (32, 1, 3, 3), groups=32)   # 32 subvectors
        weight = torch.randn(geometry.weight_shape, generator=_gen(0))
        k = clamp_n_centroids(256, geometry.n_subvectors(9))
        assert k == 4
    else:
        weight = _weight()
        metric = torch.zeros(9, 9, dtype=torch.float64)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb = fit_codebook(weight, geometry, metric, k, 9, n_iter=50, seed=0, name=case)
    assert time.perf_counter() - start < 20
    obj = cb.objective
    assert len(obj) == 51 and all(b <= a + 1e-12 for a, b in zip(obj, obj[1:]))
    assert int(cb.assignments.max()) < k
    assert torch.isfinite(cb.centroids).all()
    if case == "all_zero":
        assert torch.equal(cb.decode(geometry), weight) and cb.n_empty_repaired == 0
    if case == "zero_metric":
        assert obj == tuple([0.0] * 51)


def test_empty_clusters_are_repaired_by_splitting():
    """Random init that picks the same value several times leaves clusters empty; the
    bounded split repairs them and the objective keeps decreasing."""
    base = torch.randn(9, generator=_gen(0))
    sub = torch.cat([base.expand(480, 9), torch.randn(32, 9, generator=_gen(1))])
    weight = sub.reshape(16, 32, 9).transpose(0, 1).reshape(CONV.weight_shape)
    cb = fit_codebook(weight, CONV, _gram(9, 0), 8, 9, n_iter=20, seed=0)
    assert cb.n_empty_repaired > 0
    obj = cb.objective
    assert all(b <= a + 1e-12 * obj[0] for a, b in zip(obj, obj[1:]))
    assert obj[-1] < obj[0]
    # every centroid ends up used
    assert torch.bincount(cb.assignments, minlength=8).min() > 0


def test_identical_clusters_are_not_split_again_and_again():
    """Regression: a cluster whose members are all identical used to be split at every
    iteration (a useless duplicate centroid, O(K·N) work per iteration)."""
    weight = torch.zeros(CONV.weight_shape)
    weight[0, 0] = 1.0                                   # two distinct subvectors
    with pytest.warns(UserWarning):
        cb = fit_codebook(weight, CONV, None, 8, 9, n_iter=20)
    assert cb.n_empty_repaired == 0
    assert torch.equal(cb.decode(CONV), weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_name_the_layer(bad):
    weight = _weight()
    weight[1, 2, 0, 0] = bad
    with pytest.raises(ValueError, match=r"layer3\.0\.conv1"):
        fit_codebook(weight, CONV, None, 4, 9, name="layer3.0.conv1")
    metric = _gram(9)
    metric[2, 3] = bad
    with pytest.raises(ValueError, match=r"layer3\.0\.conv1"):
        fit_codebook(_weight(), CONV, metric, 4, 9, name="layer3.0.conv1")


def test_invalid_arguments_are_errors():
    with pytest.raises(ValueError, match="fc"):
        fit_codebook(_weight(), CONV, None, 0, 9, name="fc")
    with pytest.raises(ValueError, match="fc"):
        fit_codebook(_weight(), CONV, None, -3, 9, name="fc")
    with pytest.raises(ValueError, match="fc"):
        fit_codebook(_weight(), CONV, None, 4, 9, init="farthest", name="fc")
    with pytest.raises(ValueError, match="fc"):
        fit_codebook(_weight(), CONV, None, 4, 9, refine="elkan", name="fc")
    with pytest.raises(ValueError, match="fc"):
        fit_codebook(_weight(), CONV, None, 4, 5, name="fc")          # 5 does not divide 144
    with pytest.raises(ValueError, match="fc"):
        fit_codebook(_weight(), CONV, torch.eye(4), 4, 9, name="fc")
    with pytest.raises(ValueError, match="fc"):
        fit_codebook(torch.zeros(3, 3), CONV, None, 4, 9, name="fc")
    with pytest.raises(ValueError):
        clamp_n_centroids(0, 100)


def test_m_step_is_the_least_squares_solution():
    """At convergence every centroid is the mean of its subvectors, which with a
    full-rank X̃ is the least-squares solution of the stacked system X̃ c ≈ X̃ w_i."""
    gen = _gen(9)
    x_tilde = torch.randn(60, 9, generator=gen, dtype=torch.float64)
    metric = x_tilde.T @ x_tilde
    weight = _weight(seed=9, dtype=torch.float64)
    cb = fit_codebook(weight, CONV, metric, 6, 9, n_iter=100, seed=0)
    assert cb.objective[-1] == cb.objective[-2]                      # converged
    w = to_subvectors(weight, CONV, 9)
    for c in range(6):
        members = w[cb.assignments == c]
        assert members.shape[0] > 0
        torch.testing.assert_close(cb.centroids[c], members.mean(0), rtol=1e-12, atol=1e-12)
        if c < 2:
            a = x_tilde.repeat(members.shape[0], 1)                  # stacked system
            b = (members @ x_tilde.T).reshape(-1, 1)
            lstsq = torch.linalg.lstsq(a, b).solution.flatten()
            torch.testing.assert_close(lstsq, cb.centroids[c], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape,block_size,requested,expected", [
    ((64, 64, 1, 1), 8, 256, 64),          # ResNet-50 large layer1.0.conv1: 512 subvectors
    ((1000, 512), 4, 2048, 2048),          # ResNet-18 fc: 128000 subvectors
    ((1000, 2048), 4, 1024, 1024),         # ResNet-50 fc
    ((64, 64, 3, 3), 9, 256, 256),         # 4096 subvectors: bound 512
    ((64, 64, 1, 1), 4, 256, 256),         # 1024 subvectors: n/4 = 256 exactly -> 128 < 256 -> 128
])
def test_clamp_rule_on_paper_layers(shape, block_size, requested, expected):
    kind = "linear" if len(shape) == 2 else "conv2d"
    n_sub = LayerGeometry(kind, shape).n_subvectors(block_size)
    if shape == (64, 64, 1, 1) and block_size == 4:
        expected = 128
    assert clamp_n_centroids(requested, n_sub) == expected


@pytest.mark.parametrize("n_sub,expected", [
    (1, 1), (2, 1), (4, 1), (5, 1), (8, 1), (9, 2), (16, 2), (17, 4), (32, 4), (33, 8),
    (1024, 128), (1025, 256), (4096, 512), (4097, 1024),
])
def test_clamp_rule_is_strictly_below_a_quarter(n_sub, expected):
    assert clamp_n_centroids(10**6, n_sub) == expected
    assert clamp_n_centroids(3, n_sub) == min(3, expected)


def _sse(w64, assignments, metric64, k):
    """Σ_i (w_i − μ_a(i))ᵀ G (w_i − μ_a(i)) with the exact float64 means."""
    counts = torch.bincount(assignments, minlength=k)
    means = torch.zeros(k, w64.shape[1], dtype=torch.float64).index_add_(0, assignments, w64)
    means = means / counts.clamp_min(1).unsqueeze(1)
    diff = w64 - means[assignments]
    return float(((diff @ metric64) * diff).sum()), means, counts


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hartigan_round_gains_are_exact(seed, dtype):
    """One round on a random partition: every cluster takes part in one move at most,
    every gain is positive, and the objective (with exact means) drops by their sum."""
    gen = _gen(seed)
    k, n = 24, 300
    w64 = torch.randn(n, 9, generator=gen, dtype=torch.float64)
    metric64 = _gram(9, seed)
    assignments = torch.arange(n) % k
    assignments = assignments[torch.randperm(n, generator=gen)]
    before, means, counts = _sse(w64, assignments, metric64, k)
    frozen = torch.zeros(k, dtype=torch.bool)
    frozen[:3] = True
    x_aug = torch.cat([w64, ((w64 @ metric64) * w64).sum(1, keepdim=True)], 1).to(dtype)
    rows, dst, gain, share = _hartigan_moves(x_aug, w64, means.to(dtype), means, metric64.to(dtype),
                                             metric64, assignments, counts, frozen)
    assert rows.numel() > 1                                  # a random partition is far from stable
    assert 0 < share <= 1                                    # ... and has pending Lloyd moves
    src = assignments[rows]
    clusters = torch.cat([src, dst])
    assert clusters.unique().numel() == clusters.numel()    # disjoint pairs
    assert not frozen[clusters].any() and (dst != src).all()
    assert (gain > 0).all() and torch.equal(gain, gain.sort(descending=True).values)
    moved = assignments.clone()
    moved[rows] = dst
    after, _, _ = _sse(w64, moved, metric64, k)
    assert before - after == pytest.approx(float(gain.sum()), rel=1e-9)


def test_hartigan_leaves_a_lloyd_fixed_point_that_lloyd_cannot():
    """Scalars 0, 2, 3.1 and K = 2. From the centroids {2, 3.1}, Lloyd converges to
    {0, 2} | {3.1} (SSE 2: 2 is closer to 1 than to 3.1) and stays there; moving 2 over
    lowers the SSE to 0.605 ({0} | {2, 3.1}), which one Hartigan round finds."""
    geometry = LayerGeometry("linear", (3, 1))
    weight = torch.tensor([[0.0], [2.0], [3.1]], dtype=torch.float64)
    total = 0.0 + 4.0 + 3.1 ** 2
    stuck = 0
    for seed in range(8):
        lloyd = fit_codebook(weight, geometry, None, 2, 1, n_iter=5, seed=seed, refine="lloyd")
        hart = fit_codebook(weight, geometry, None, 2, 1, n_iter=5, seed=seed)
        assert hart.objective[-1] == pytest.approx(0.605 / total, rel=1e-12)   # the optimum, every seed
        assert hart.objective[0] == lloyd.objective[0]                          # same initial E-step
        if lloyd.objective[-1] == pytest.approx(2.0 / total, rel=1e-12):
            stuck += 1
            assert hart.objective[1] < lloyd.objective[1] == lloyd.objective[-1]
            assert set(lloyd.assignments.tolist()) == {0, 1} and lloyd.assignments[0] == lloyd.assignments[1]
        assert torch.equal(hart.decode(geometry)[1:], torch.full((2, 1), 2.55, dtype=torch.float64))
    assert stuck > 0                                         # the case is exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hartigan_beats_lloyd_with_few_subvectors_per_centroid(dtype):
    """16 subvectors per centroid, as for a 64x64 3x3 conv with K = 256: at the same
    iteration count the Hartigan rounds give a lower objective than plain Lloyd."""
    geometry = LayerGeometry("conv2d", (64, 16, 3, 3))     # 1024 subvectors, K = 64
    ratios = []
    for seed in range(3):
        weight, metric = _weight(geometry, seed=seed, dtype=dtype), _gram(9, seed)
        hart = fit_codebook(weight, geometry, metric, 64, 9, n_iter=20, seed=seed)
        lloyd = fit_codebook(weight, geometry, metric, 64, 9, n_iter=20, seed=seed, refine="lloyd")
        assert hart.objective[0] == lloyd.objective[0]
        assert all(b <= a + 1e-12 * hart.objective[0] for a, b in zip(hart.objective, hart.objective[1:]))
        assert hart.objective[-1] < lloyd.objective[-1]
        ratios.append(hart.objective[-1] / lloyd.objective[-1])
    assert sum(ratios) / len(ratios) < 0.99, ratios


def test_hartigan_fixed_point_has_no_improving_single_move():
    """Run to convergence: no single move of one subvector (with both means updated)
    lowers the objective, checked by brute force over every (subvector, cluster)."""
    weight, metric = _weight(seed=6, dtype=torch.float64), _gram(9, 6)
    k = 12
    cb = fit_codebook(weight, CONV, metric, k, 9, n_iter=100, seed=0)
    assert cb.objective[-1] == cb.objective[-2]
    w64 = to_subvectors(weight, CONV, 9)
    sse, means, counts = _sse(w64, cb.assignments, metric, k)
    assert sse / float(((w64 @ metric) * w64).sum()) == pytest.approx(cb.objective[-1], rel=1e-9)
    torch.testing.assert_close(cb.centroids, means, rtol=1e-12, atol=1e-12)
    diff = w64[:, None, :] - means[None]                                       # (N, K, d)
    dist = ((diff @ metric) * diff).sum(-1)                                    # (N, K)
    n = counts.double()
    a = cb.assignments
    own = dist[torch.arange(len(a)), a] * n[a] / (n[a] - 1).clamp_min(1)
    own[n[a] < 2] = 0.0
    gain = own[:, None] - dist * n / (n + 1)
    gain[torch.arange(len(a)), a] = 0.0
    assert float(gain.max()) <= 1e-12 * sse


def test_fast_argmin_finds_the_row_minimum():
    gen = _gen(0)
    for k in (7, 64, 256, 1024):
        scores = torch.randn(300, k, generator=gen)
        scores[:, k // 2] = scores.amin(1) - 1                           # a known minimum
        scores[5, :] = 0.0                                               # all tied
        idx = _argmin_rows(scores)
        assert torch.equal(scores.gather(1, idx[:, None]).squeeze(1), scores.amin(1))
        assert torch.equal(idx[torch.arange(300) != 5], torch.full((299,), k // 2))


def _lane_argmin(scores):
    """The lane-wise argmin ``_argmin_rows`` was written as (its tie order is kept): with K = 32 G,
    the lowest lane (column % 32) among the tied minima, then the lowest group (column // 32)."""
    n, k = scores.shape
    if k % 32 or k < 64:
        return scores.argmin(1)
    by_lane = scores.view(n, k // 32, 32)
    lane = by_lane.amin(1).argmin(1)
    group = by_lane.gather(2, lane.view(n, 1, 1).expand(n, k // 32, 1)).squeeze(2).argmin(1)
    return group * 32 + lane


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_argmin_rows_keeps_its_tie_order(dtype):
    gen = _gen(4)
    for k in (7, 48, 64, 96, 256, 1024):
        for n in (1, 2, 300):
            scores = torch.randint(0, 6, (n, k), generator=gen).to(dtype)          # many exact ties
            scores[torch.rand(n, k, generator=gen) < 0.2] = float("inf")           # (Hartigan's masked costs)
            scores[0, :] = 2.0                                                     # a row all tied
            expected = _lane_argmin(scores)
            kept = scores.clone()
            assert torch.equal(_argmin_rows(scores), expected)
            assert torch.equal(scores, kept)                                       # not overwritten
            assert torch.equal(_argmin_rows(scores, overwrite=True), expected)


def test_nearest_keeps_tied_current_and_argmins_the_rest():
    # duplicated centroids give exactly tied scores; small chunks make the rows whose argmin is
    # taken later span several chunks and flushes
    gen = _gen(5)
    d, k, n, chunk = 4, 64, 500, 7
    w = torch.randn(n, d, generator=gen)
    c = torch.randn(k, d, generator=gen)
    c[32:] = c[:32]                                                                # column j ties j ± 32
    w[::5] = c[torch.randint(k, (100,), generator=gen)]                            # rows on a centroid
    metric = _gram(d, 5, dtype=torch.float32)
    current = torch.randint(k, (n,), generator=gen)
    current[::5] = torch.randint(k, (100,), generator=gen)
    w_aug = torch.cat([w, torch.ones(n, 1)], 1)
    cg = c @ metric
    cols = torch.cat([-2 * cg, (c * cg).sum(1, keepdim=True)], 1).T.contiguous()
    scores = torch.cat([torch.mm(w_aug[s:s + chunk], cols) for s in range(0, n, chunk)])
    own = scores.gather(1, current[:, None]).squeeze(1)
    expected = torch.where(own <= scores.amin(1), current, _lane_argmin(scores))
    got = kmeans._nearest(w, c, metric, current, chunk=chunk)
    assert torch.equal(got, expected)
    assert torch.equal(kmeans._nearest(w, c, metric, chunk=chunk), _lane_argmin(scores))
    tied = (own == scores.amin(1)) & (scores == scores.amin(1, keepdim=True)).sum(1).gt(1)
    assert tied.any() and torch.equal(got[tied], current[tied])                    # ties keep the current


def test_relative_error():
    w = torch.tensor([3.0, 4.0])
    assert relative_error(w, w) == 0.0
    assert relative_error(w, torch.zeros(2)) == 1.0


def test_distinct_rows_counts_like_unique_and_treats_signed_zeros_as_equal():
    gen = _gen(3)
    base = torch.randn(40, 3, generator=gen)
    rows = base[torch.randint(40, (500,), generator=gen)]
    rows[:20] = 0.0
    rows[20:40] = -0.0                                                   # equal to 0.0 for unique
    exact = torch.unique(rows, dim=0)
    for k in (1, 10, exact.shape[0] - 1):
        assert _distinct_rows(rows, k) is None                           # more than k distinct: no sort
    for k in (exact.shape[0], exact.shape[0] + 5, 1000):
        assert torch.equal(_distinct_rows(rows, k), exact)
    assert torch.equal(_distinct_rows(rows.double(), exact.shape[0]), torch.unique(rows.double(), dim=0))


@pytest.mark.parametrize("refine", ["hartigan", "lloyd"])
def test_objective_kept_from_cluster_sums_matches_the_residuals(refine, monkeypatch):
    # above _EXACT_BELOW weights (here: always) the per-iteration objective comes from the cluster
    # sums kept through E-step moves, Hartigan moves and repairs; the last value of a shorter fit
    # (same seed, same path) is computed from the residuals
    monkeypatch.setattr(kmeans, "_EXACT_BELOW", 0)
    weight, metric = _weight(seed=6), _gram(9, 6)
    long = fit_codebook(weight, CONV, metric, 32, 9, n_iter=8, seed=2, refine=refine).objective
    for t in (1, 4, 8):
        short = fit_codebook(weight, CONV, metric, 32, 9, n_iter=t, seed=2, refine=refine).objective
        assert short[:-1] == long[:t]
        assert short[-1] == pytest.approx(long[t], rel=1e-10, abs=1e-14)


def test_the_faiss_backend_finds_the_same_codebooks_up_to_ties(one_thread):
    """The faiss E-step searches the same nearest centroids under the metric (through the metric's
    square root); every assignment still needs a strictly smaller float64 distance to change, so
    the objective matches the default backend's and a fit is reproducible."""
    pytest.importorskip("faiss")
    from bgd_dist.kmeans_faiss import faiss_search

    gen = torch.Generator().manual_seed(3)
    geometry = LayerGeometry("conv2d", (32, 16, 3, 3), padding=(1, 1))
    weight = torch.randn(32, 16, 3, 3, generator=gen)
    a = torch.randn(9, 9, generator=gen)
    metric = a @ a.T + 0.1 * torch.eye(9)
    for refine in ("lloyd", "hartigan"):
        ours = fit_codebook(weight, geometry, metric, 32, 9, n_iter=15, seed=1, refine=refine)
        fast = fit_codebook(weight, geometry, metric, 32, 9, n_iter=15, seed=1, refine=refine, search=faiss_search)
        again = fit_codebook(weight, geometry, metric, 32, 9, n_iter=15, seed=1, refine=refine, search=faiss_search)
        assert torch.equal(fast.assignments, again.assignments) and torch.equal(fast.centroids, again.centroids)
        assert fast.objective[-1] == pytest.approx(ours.objective[-1], rel=1e-3)
        assert all(b <= a_ * (1 + 1e-9) for a_, b in zip(fast.objective, fast.objective[1:]))
    # a singular metric (rank 3): the search works through its eigendecomposition
    low = torch.randn(9, 3, generator=gen)
    singular = fit_codebook(weight, geometry, low @ low.T, 32, 9, n_iter=10, seed=1, refine="lloyd",
                            search=faiss_search)
    plain = fit_codebook(weight, geometry, low @ low.T, 32, 9, n_iter=10, seed=1, refine="lloyd")
    assert singular.objective[-1] == pytest.approx(plain.objective[-1], rel=1e-2, abs=1e-6)
