"""Per-layer size allocation under a byte budget (bgd_dist.core.budget)."""

import itertools
import math
import random

import pytest

from bgd_dist.core.budget import Allocation, Option, allocate, candidate_options, option_bytes
from bgd_dist.core.kmeans import clamp_n_centroids
from bgd_dist.core.layouts import LayerGeometry
from bgd_dist.core.sizing import MB, layer_size


def opts(*pairs):
    """Options from (bytes, error) pairs; block_size/n_centroids number them for identification."""
    return [Option(1, i, float(b), float(e)) for i, (b, e) in enumerate(pairs)]


def brute_force(options, budget):
    """Minimum total error over all choices within the budget (and one choice attaining it)."""
    names = sorted(options)
    best = None
    for combo in itertools.product(*(options[n] for n in names)):
        if math.fsum(o.nbytes for o in combo) <= budget:
            err = math.fsum(o.error for o in combo)
            if best is None or err < best[0]:
                best = (err, dict(zip(names, combo)))
    return best


def random_instance(rng, convex=False):
    options = {}
    for i in range(rng.randint(3, 4)):
        n = rng.randint(3, 5)
        if convex:  # strictly convex: increasing byte steps, decreasing error drops per byte
            slopes = sorted((rng.uniform(0.05, 2.0) for _ in range(n - 1)), reverse=True)
            widths = [rng.randint(1, 30) for _ in slopes]
            b = float(rng.randint(1, 20))
            e = rng.uniform(0.5, 5.0) + sum(s * w for s, w in zip(slopes, widths))
            pairs = [(b, e)]
            for s, w in zip(slopes, widths):
                b, e = b + w, e - s * w
                pairs.append((b, e))
            rng.shuffle(pairs)
        else:
            pairs = [(rng.randint(1, 100), rng.uniform(0.1, 10)) for _ in range(n)]
        options[f"layer{i}"] = opts(*pairs)
    return options


def test_option_records_are_from_the_inputs_and_budget_is_respected():
    rng = random.Random(0)
    for _ in range(20):
        options = random_instance(rng)
        lo = sum(min(o.nbytes for o in v) for v in options.values())
        hi = sum(max(o.nbytes for o in v) for v in options.values())
        budget = rng.uniform(lo, hi)
        a = allocate(options, budget)
        assert isinstance(a, Allocation) and a.budget_bytes == budget
        assert set(a.choices) == set(options)
        assert all(a.choices[n] in options[n] for n in options)
        assert a.total_bytes <= budget
        assert a.total_bytes == pytest.approx(sum(o.nbytes for o in a.choices.values()))
        assert a.total_error == pytest.approx(sum(o.error for o in a.choices.values()))


def test_infeasible_budget_names_the_minimum():
    options = {"a": opts((100, 1), (50, 5)), "b": opts((30, 2), (70, 1))}
    minimum = 80.0
    with pytest.raises(ValueError, match=r"80\.000 bytes \(0\.0001 MB\).*79\.500 bytes"):
        allocate(options, 79.5)
    # exactly the minimum is feasible: the cheapest option of every layer
    a = allocate(options, minimum)
    assert a.total_bytes == minimum
    assert a.choices == {"a": options["a"][1], "b": options["b"][0]}


def test_infeasible_message_in_mb():
    options = {"big": opts((3 * MB, 1.0))}
    with pytest.raises(ValueError, match=r"3\.0000 MB.*2\.0000 MB"):
        allocate(options, 2 * MB)


def test_huge_budget_gives_every_layer_its_minimum_error_option():
    rng = random.Random(1)
    for budget in (1e12, math.inf):
        options = random_instance(rng)
        a = allocate(options, budget)
        for name, choice in a.choices.items():
            assert choice.error == min(o.error for o in options[name])


def test_ties_and_dominated_options():
    # cheapest start ties on bytes -> lowest error; equal error at more bytes is never taken
    options = {"a": opts((10, 7), (10, 5), (20, 3), (30, 3))}
    assert allocate(options, 10).choices["a"] == options["a"][1]
    assert allocate(options, 1e9).choices["a"] == options["a"][2]


def test_hull_phase_takes_best_ratio_first():
    options = {"a": opts((0, 10), (10, 5)), "b": opts((0, 10), (10, 8))}
    a = allocate(options, 10)
    assert a.choices == {"a": options["a"][1], "b": options["b"][0]}


def test_hull_phase_skips_an_upgrade_that_does_not_fit():
    # a's step has the best ratio but needs 50 bytes; b's smaller step fits in 20
    options = {"a": opts((0, 100), (50, 0)), "b": opts((0, 10), (20, 9))}
    a = allocate(options, 20)
    assert a.choices == {"a": options["a"][0], "b": options["b"][1]}


def test_ties_on_ratio_go_by_layer_name():
    options = {"b": opts((0, 10), (10, 5)), "a": opts((0, 10), (10, 5))}
    a = allocate(options, 15)
    assert a.choices == {"a": options["a"][1], "b": options["b"][0]}
    assert list(a.choices) == ["a", "b"]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_optimal_at_hull_breakpoints(seed):
    """With all segments ranked by error drop per byte, taking the top k (prefixes of every convex
    layer) is optimal for a budget equal to its bytes (Lagrangian argument); greedy must find it."""
    rng = random.Random(100 + seed)
    options = random_instance(rng, convex=True)
    segments = []  # (ratio, name, next option) along each layer's sorted options
    for name, os in options.items():
        os = sorted(os, key=lambda o: o.nbytes)
        for p, q in zip(os, os[1:]):
            segments.append(((p.error - q.error) / (q.nbytes - p.nbytes), name, q))
    segments.sort(key=lambda s: -s[0])
    base = {name: min(os, key=lambda o: o.nbytes) for name, os in options.items()}
    for k in range(len(segments) + 1):
        target = dict(base)
        for _, name, q in segments[:k]:
            if q.nbytes > target[name].nbytes:
                target[name] = q
        budget = math.fsum(o.nbytes for o in target.values())
        a = allocate(options, budget)
        best_err, _ = brute_force(options, budget)
        assert a.choices == target
        assert a.total_error == pytest.approx(best_err, rel=1e-12, abs=1e-12)


def test_greedy_is_close_to_brute_force_on_random_instances():
    rng = random.Random(2024)
    exact = 0
    for _ in range(30):
        options = random_instance(rng)
        lo = sum(min(o.nbytes for o in v) for v in options.values())
        hi = sum(max(o.nbytes for o in v) for v in options.values())
        budget = rng.uniform(lo, hi)
        a = allocate(options, budget)
        best_err, _ = brute_force(options, budget)
        assert a.total_bytes <= budget
        assert best_err - 1e-9 <= a.total_error <= 1.25 * best_err
        exact += a.total_error == pytest.approx(best_err)
    assert exact >= 24


def test_fill_phase_uses_leftover_budget():
    # (50, 6) lies above the hull segment (0, 10)-(100, 0): the hull step needs 100 bytes,
    # which does not fit in 60, so only the fill phase reaches (50, 6)
    options = {"a": opts((0, 10), (100, 0), (50, 6), (30, 9))}
    a = allocate(options, 60)
    assert a.choices["a"] == options["a"][2]
    assert a.total_bytes == 50


def test_fill_phase_after_hull_steps_across_layers():
    # hull: a (0,10)->(10,4); b (0,10)->(40,0) with (25,7) above the hull
    options = {"a": opts((0, 10), (10, 4)), "b": opts((0, 10), (40, 0), (25, 7))}
    a = allocate(options, 36)
    assert a.choices == {"a": options["a"][1], "b": options["b"][2]}
    assert a.total_error == brute_force(options, 36)[0]


def test_fill_phase_repeats_until_nothing_fits():
    # every option but the ends lies above its layer's hull segment (0, 10)-(100, 0), and hull
    # steps need 100 bytes: the fill phase takes b's (30, 8) (largest drop), then a's (20, 9)
    options = {"a": opts((0, 10), (100, 0), (20, 9)), "b": opts((0, 10), (100, 0), (20, 8.5), (30, 8))}
    a = allocate(options, 50)
    assert a.choices == {"a": options["a"][2], "b": options["b"][3]}
    assert a.total_error == brute_force(options, 50)[0] == 17


def test_fill_phase_prefers_largest_error_decrease():
    # both off-hull options fit in 40, not together; b's (40, 7) drops more error (3) than
    # a's (10, 9.2) (0.8) though its drop per byte is lower
    options = {"a": opts((0, 10), (100, 0), (10, 9.2)), "b": opts((0, 10), (100, 0), (40, 7))}
    a = allocate(options, 40)
    assert a.choices == {"a": options["a"][0], "b": options["b"][2]}


def test_empty_and_invalid_inputs():
    empty = allocate({}, 0.0)
    assert empty.choices == {} and empty.total_bytes == 0 and empty.total_error == 0
    with pytest.raises(ValueError, match="'conv1'.*no options"):
        allocate({"conv1": [], "fc": opts((1, 1))}, 10)
    with pytest.raises(ValueError, match="'fc'"):
        allocate({"fc": opts((1, float("nan")))}, 10)
    with pytest.raises(ValueError, match="'fc'"):
        allocate({"conv1": opts((1, 1)), "fc": opts((1, 1), (2, -0.5))}, 10)


def test_candidate_options_divides_and_clamps():
    g = LayerGeometry("conv2d", (64, 32, 3, 3))  # row length 288, 64 rows
    # d=4: 4608 subvectors -> K <= 1024; d=9: 2048 -> K <= 256; d=18: 1024 -> K <= 128; 5 does not divide
    got = candidate_options(g, "conv", [18, 5, 9, 4], [2048, 256])
    assert got == [(4, 256), (4, 1024), (9, 256), (18, 128)]
    for d, k in got:
        assert k == clamp_n_centroids(k, g.n_subvectors(d))
    unclamped = candidate_options(g, "conv", [9, 5, 9], [256, 2048, 256], clamp=False)
    assert unclamped == [(9, 256), (9, 2048)]


def test_candidate_options_raises_when_nothing_divides():
    g = LayerGeometry("linear", (10, 7))
    with pytest.raises(ValueError, match=r"'fc'.*row length 7"):
        candidate_options(g, "fc", [2, 4], [256])
    assert candidate_options(g, "fc", [2, 7], [256]) == [(7, 2)]  # 10 subvectors: K < 2.5
    assert candidate_options(LayerGeometry("linear", (4, 7)), "fc", [7], [256]) == [(7, 1)]


def test_option_bytes_matches_sizing():
    g = LayerGeometry("conv2d", (64, 32, 3, 3))
    # d=9, K=256: 2048 indexes of 8 bits + 256 * 9 fp16 values
    assert option_bytes(g, "conv", 9, 256) == 2048 + 256 * 9 * 2
    for geometry in (g, LayerGeometry("linear", (100, 64)), LayerGeometry("conv_transpose2d", (16, 8, 2, 2))):
        for d, k in candidate_options(geometry, "x", [1, 2, 4, 8, 9], [16, 100, 256]):
            assert option_bytes(geometry, "x", d, k) == layer_size("x", geometry, d, k, False).nbytes
    with pytest.raises(ValueError, match="'conv'"):
        option_bytes(g, "conv", 5, 256)


def test_exact_allocation_is_the_brute_force_optimum_up_to_the_rounding_of_sizes():
    import itertools
    import random

    from bgd_dist.core.budget import allocate_exact

    rng = random.Random(7)
    for trial in range(25):
        options = {f"l{i}": [Option(4, 2 ** j, rng.uniform(10, 1000), rng.uniform(0, 1)) for j in range(4)]
                   for i in range(3)}
        lo = sum(min(o.nbytes for o in opts) for opts in options.values())
        hi = sum(max(o.nbytes for o in opts) for opts in options.values())
        budget = rng.uniform(lo, hi)
        got = allocate_exact(options, budget, resolution=5000)
        assert got.total_bytes <= budget
        combos = list(itertools.product(*(options[n] for n in sorted(options))))

        def optimum(b):
            errors = [sum(o.error for o in c) for c in combos if sum(o.nbytes for o in c) <= b]
            return min(errors) if errors else math.inf

        # at least as good as the optimum with 3 rounding units less, never better than the true one
        assert optimum(budget) - 1e-12 <= got.total_error <= optimum(budget - 3 * budget / 5000) + 1e-12
        greedy = allocate(options, budget)
        assert got.total_error <= greedy.total_error + 1e-12
    with pytest.raises(ValueError, match="infeasible"):
        allocate_exact({"a": [Option(4, 16, 100.0, 0.1)]}, 50.0)
