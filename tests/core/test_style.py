"""StyleInject (Zhou et al., 2024): Delta h = B sum_i s_i A_i(x), routed by feature statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import core
from core.errors import ConfigError
from core.methods.style import StyleInject, StyleInjectAdapter, instance_stats
from core.registry import METHODS


def test_registered_and_validated():
    assert METHODS["styleinject"] is StyleInject
    with pytest.raises(ConfigError):
        StyleInject(targets=["fc"], num_styles=0)
    with pytest.raises(ConfigError):
        StyleInject(targets=["fc"], router_stats="max")


def test_linear_starts_unchanged_and_matches_equation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    x = torch.randn(3, 7, 6)
    before = model(x)
    core.inject(model, StyleInject(targets=["0"], r=2, num_styles=3, alpha=4.0))
    assert torch.allclose(model(x), before)  # B = 0 at start
    ad = model[0].adapters["default"]
    assert isinstance(ad, StyleInjectAdapter)
    with torch.no_grad():
        ad.B.normal_()
        ad.router.weight.normal_()
    std = x.var(dim=1, correction=0).add(1e-5).sqrt()
    s = torch.softmax(ad.router(std), dim=-1)  # (3, n)
    a = ad.A.view(3, 2, 6)
    mixed = sum(s[:, i, None, None] * (x @ a[i].T) for i in range(3))
    expected = before + 2.0 * mixed @ ad.B.T
    assert torch.allclose(model(x), expected, atol=1e-5)
    # each sample is routed by its own statistics
    assert not torch.allclose(s[0], s[1])


def test_conv_router_on_pooled_features_and_param_count():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    model = nn.Sequential(conv)
    core.inject(model, StyleInject(targets=["0"], r=2, num_styles=2, router_stats="mean_std"))
    ad = model[0].adapters["default"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 2 * 4 * 9 + 6 * 2 + (2 * 8 + 2)
    x = torch.randn(2, 4, 5, 5)
    assert instance_stats(x, "conv", "mean_std").shape == (2, 8)
    with torch.no_grad():
        ad.B.normal_()
    y = model(x)
    assert y.shape == (2, 6, 5, 5)
    y.sum().backward()
    assert ad.router.weight.grad is not None and ad.A.grad.abs().sum() > 0


def test_cannot_merge():
    model = nn.Sequential(nn.Linear(4, 4))
    core.inject(model, StyleInject(targets=["0"]))
    with pytest.raises(core.MergeError):
        core.merge(model)
