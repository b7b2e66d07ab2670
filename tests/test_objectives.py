"""The one table of objectives: what each collects, how it fits, when it falls back."""

import pytest
import torch
from torch import nn

from bgd_dist.cli import get_args_parser
from bgd_dist.config import HessianConfig, QuantizeConfig
from bgd_dist.core.layouts import geometry_of
from bgd_dist.core.stats import make_stats
from bgd_dist.messages import FitJob, FitSettings
from bgd_dist.objectives import NAMES, OBJECTIVES, objective, resolve
from bgd_dist.plan import LayerPlan, Rule
from bgd_dist.worker import run_fit


def test_every_objective_collects_known_statistics_and_fits():
    geometry = geometry_of(nn.Linear(8, 6))
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    for name, o in OBJECTIVES.items():
        stats = make_stats(o.stats, geometry, 2, "fc")
        if o.needs_calibration:
            stats.update(torch.randn(32, 8, generator=torch.Generator().manual_seed(1)))
        metric = stats.metric() if o.needs_calibration else None
        result = run_fit(FitJob("fc", w, geometry, metric, 4, 2, 0, name, FitSettings(3, hessian_rounds=1)))
        assert result.name == "fc" and result.codebook.centroids.shape == (4, 2)


def test_the_hessian_objective_falls_back_to_paper_with_a_reason():
    big = LayerPlan("big", geometry_of(nn.Linear(64, 4)), False, 4, 4, 4, "hessian")
    used, why = resolve(big, HessianConfig(max_mb=0.001))
    assert used.name == "paper" and used.stats == "gram" and "max_mb" in why
    assert resolve(big, HessianConfig()) == (objective("hessian"), None)
    assert resolve(LayerPlan("w", big.geometry, False, 4, 4, 4, "weights"), HessianConfig())[0].stats == "identity"
    with pytest.raises(ValueError, match="unknown objective 'fancy'"):
        objective("fancy")


def test_config_rules_and_cli_accept_exactly_the_table():
    for name in NAMES:
        QuantizeConfig(rules=(Rule(".*", block_size=4),), objective=name)
        Rule("fc", block_size=4, objective=name)
        assert get_args_parser().parse_args(["quantize", "p.yaml", "--objective", name]).objective == name
    with pytest.raises(ValueError, match="objective"):
        QuantizeConfig(rules=(Rule(".*", block_size=4),), objective="fancy")
    with pytest.raises(ValueError, match="objective"):
        Rule("fc", block_size=4, objective="fancy")
