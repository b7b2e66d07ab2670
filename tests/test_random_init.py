"""A model built without weights is the same in every process that builds it (the driver and each
worker), whatever random numbers were drawn before, and building it leaves the caller's random
state alone."""

import pytest
import torch


def build(kind):
    if kind == "classifier":
        from classification.models import build_classifier

        return build_classifier("resnet18", num_classes=10)
    from detection.models import build_maskrcnn

    return build_maskrcnn("maskrcnn_small")


@pytest.mark.parametrize("kind", ["classifier", "maskrcnn"])
def test_random_initialisation_is_fixed_and_leaves_the_callers_state(kind):
    torch.manual_seed(1)
    first = build(kind).state_dict()
    after_build = torch.rand(3)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(2)
    torch.rand(100)
    second = build(kind).state_dict()
    assert torch.equal(after_build, expected)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
