"""Mixup in ``AudioClassifier``: inputs and one-hot labels mixed with the same sampled
lambda and partners, the loss a cross-entropy against those soft targets, no mixing when
evaluating or with alpha 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from audio_toy import TINY_AST

from audio.module import AudioClassifier

pytestmark = pytest.mark.usefixtures("single_thread")
CLASSES = 4


def classifier(mixup_alpha: float, label_smoothing: float = 0.0) -> AudioClassifier:
    return AudioClassifier(
        tuning="linear",
        ast_config=TINY_AST,
        num_classes=CLASSES,
        max_length=100,
        mixup_alpha=mixup_alpha,
        label_smoothing=label_smoothing,
    )


def batch(size: int = 6):
    torch.manual_seed(1)
    return torch.randn(size, 100, 128), torch.tensor([0, 1, 2, 3, 0, 1][:size]), torch.arange(size)


def test_mix_is_the_convex_combination_with_the_sampled_lambda():
    module = classifier(mixup_alpha=0.4).train()
    x, y, _ = batch()
    lams = set()
    for seed in range(5):
        torch.manual_seed(seed)
        mixed = module.mix(x, y)
        lam, perm = mixed.lam, mixed.perm
        lams.add(round(lam, 6))
        assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == list(range(6))
        torch.testing.assert_close(mixed.inputs, lam * x + (1 - lam) * x[perm])
        expected = torch.zeros(6, CLASSES)
        for i in range(6):  # lambda on the clip's own class, 1 - lambda on its partner's
            expected[i, y[i]] += lam
            expected[i, y[perm[i]]] += 1 - lam
        torch.testing.assert_close(mixed.targets, expected)
        torch.testing.assert_close(mixed.targets.sum(-1), torch.ones(6))
    assert len(lams) == 5  # a fresh lambda per batch


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_training_loss_uses_soft_targets(monkeypatch, smoothing):
    module = classifier(mixup_alpha=1.0, label_smoothing=smoothing).train()
    x, y, index = batch()
    seen = []
    original = module.mix
    monkeypatch.setattr(module, "mix", lambda *a: seen.append(original(*a)) or seen[-1])
    torch.manual_seed(3)
    loss, _ = module.compute_loss((x, y, index))
    (mixed,) = seen
    with torch.no_grad():
        logits = module(mixed.inputs).float()
    # soft cross-entropy by hand: - sum_c t_c log p_c, targets smoothed towards uniform
    target = (1 - smoothing) * mixed.targets + smoothing / CLASSES
    by_hand = -(target * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-5, atol=1e-6)
    hard = F.cross_entropy(logits, y, label_smoothing=smoothing)
    assert not torch.isclose(loss.detach(), hard, atol=1e-4)  # the mix changed the target


def test_no_mixing_when_evaluating_or_alpha_zero(monkeypatch):
    x, y, index = batch()
    for module in (classifier(mixup_alpha=0.4).eval(), classifier(mixup_alpha=0.0).train()):
        monkeypatch.setattr(module, "mix", lambda *a: pytest.fail("mixup ran"))
        loss, _ = module.compute_loss((x, y, index))
        with torch.no_grad():
            plain = F.cross_entropy(module(x).float(), y)
        torch.testing.assert_close(loss.detach(), plain)
