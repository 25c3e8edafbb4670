import pytest

import core
from core.errors import ConfigError


def test_every_registered_config_builds_from_targets_alone():
    for name, cls in core.METHODS.items():
        cfg = cls(targets=["q"])
        assert cfg.method == name
        assert isinstance(cfg.mergeable, bool)
        assert cfg.targets == ("q",)


def test_lora_paper_defaults_and_scaling():
    cfg = core.LoRA(targets=["q"])
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.init) == (8, 8.0, 0.0, "kaiming")
    assert core.LoRA(r=16, alpha=32, targets=["q"]).rank_and_scale("x.q")[1] == 2.0
    rs = core.LoRA(r=16, alpha=32, use_rslora=True, targets=["q"])
    assert rs.rank_and_scale("x.q")[1] == pytest.approx(32 / 4)
    pattern = core.LoRA(r=4, targets=["q"], rank_pattern={"layers.1.q": 2})
    assert pattern.rank_and_scale("layers.1.q")[0] == 2
    assert pattern.rank_and_scale("layers.0.q")[0] == 4


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"r": 0}, "r must be >= 1"),
        ({"r": -3}, "r must be >= 1"),
        ({"r": 8.0}, "must be an int"),
        ({"r": True}, "must be an int"),
        ({"r": "8"}, "must be an int"),
        ({"alpha": 0}, "alpha must lie in"),
        ({"alpha": -1.0}, "alpha must lie in"),
        ({"alpha": "16"}, "must be a number"),
        ({"dropout": 1.0}, "dropout must lie in"),
        ({"init": "xavier"}, "init must be one of"),
        ({"use_rslora": 1}, "use_rslora must be True or False"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
    ],
)
def test_bad_lora_fields_are_refused(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        core.LoRA(targets=["q"], **kwargs)


@pytest.mark.parametrize("targets", [[], "", [""], [3], None, "q(("])
def test_bad_targets_are_refused(targets):
    with pytest.raises(ConfigError):
        core.LoRA(targets=targets)


def test_config_round_trips_through_dict():
    cfg = core.LoRA(r=4, alpha=8, targets=["a", "b"], exclude="x.*", rank_pattern={"a": 2})
    again = core.METHODS[cfg.method](**cfg.to_dict())
    assert again == cfg
