"""The AR-CoPO loss against hand computation and docs/method.md section 3's gradient identity."""

from __future__ import annotations

import math

import pytest
import torch

from learner.loss import (
    RewardError,
    arcopo_step_loss,
    group_advantages,
    squared_distance,
    symmetric_anchors,
)


def test_advantages_by_hand():
    a = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), eps=0.0)
    mean, std = 3.0, math.sqrt((4 + 1 + 0 + 9) / 4)
    assert a.tolist() == pytest.approx([(1 - mean) / std, (2 - mean) / std, 0.0, (6 - mean) / std])
    assert a.sum().abs() < 1e-6


def test_quasi_norm_reweighting():
    a = group_advantages(torch.tensor([0.0, 1.0, 3.0]), eps=0.0)
    qa = group_advantages(torch.tensor([0.0, 1.0, 3.0]), eps=0.0, quasi_norm=True, q=0.8)
    norm = (a.abs() ** 0.8).sum() ** (1 / 0.8)
    assert torch.allclose(qa, a / norm)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_are_refused(bad):
    with pytest.raises(RewardError, match=r"branch\(es\) \[2\]"):
        group_advantages(torch.tensor([1.0, 2.0, bad, 0.5]))
    with pytest.raises(RewardError):
        group_advantages(torch.tensor([1.0]))


def test_equal_rewards_give_zero_advantages_not_nan():
    assert torch.equal(group_advantages(torch.full((4,), 0.7)), torch.zeros(4))


def test_loss_by_hand_on_small_tensors():
    # G = 3 scalar "latents", one anchor (branch 0), the anchor moved by 0.5.
    candidates = torch.tensor([[0.0], [1.0], [3.0]]).view(3, 1, 1)
    anchor = torch.tensor([[0.5]]).view(1, 1, 1)
    adv = torch.tensor([1.0, -0.5, -0.5])
    loss, stats = arcopo_step_loss(anchor, candidates, torch.tensor([0]), adv, tau=2.0, clip_eps=10.0)
    d = torch.tensor([0.25, 0.25, 6.25])
    d_old = torch.tensor([0.0, 1.0, 9.0])
    rho = torch.softmax(-d / 2, 0) / torch.softmax(-d_old / 2, 0)
    expected = -(rho * adv).mean()  # clip_eps is wide: nothing clipped
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats.clip_fraction == 0.0
    sums = squared_distance(candidates[None], anchor[:, None], "sum")
    assert sums.tolist() == [[0.25, 0.25, 6.25]]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_gradient_at_rho_one_is_the_method_identity(reduction, tau):
    gen = torch.Generator().manual_seed(0)
    G, shape = 6, (2, 3, 4)
    candidates = torch.randn(G, *shape, generator=gen)
    adv = group_advantages(torch.randn(G, generator=gen))
    anchors = torch.tensor([1, 4])
    anchor_pred = candidates[anchors].clone().requires_grad_(True)  # theta = theta_old: rho = 1
    loss, stats = arcopo_step_loss(anchor_pred, candidates, anchors, adv, tau=tau, reduction=reduction)
    loss.backward()
    assert stats.ratio_max_dev < 1e-6

    # docs/method.md: grad J = -(1/(G tau)) sum_i A_i grad d_i, so grad loss = +(1/(G tau)) sum_i A_i grad d_i,
    # averaged over the B anchors.
    expected = torch.zeros_like(anchor_pred)
    for b in range(len(anchors)):
        a = anchor_pred[b].detach().clone().requires_grad_(True)
        d = squared_distance(candidates[None], a[None, None], reduction)[0]
        expected[b] = torch.autograd.grad((adv * d).sum(), a)[0] / (G * tau * len(anchors))
    assert torch.allclose(anchor_pred.grad, expected, atol=1e-6)


def test_a_gradient_step_moves_the_anchor_toward_positive_candidates():
    gen = torch.Generator().manual_seed(1)
    candidates = torch.randn(4, 8, 2, generator=gen)
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5])
    anchor = candidates[[2]].clone().requires_grad_(True)
    before = squared_distance(candidates[None], anchor.detach()[:, None])[0]
    opt = torch.optim.SGD([anchor], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        loss, _ = arcopo_step_loss(anchor, candidates, torch.tensor([2]), adv, clip_eps=1e9)
        loss.backward()
        opt.step()
    after = squared_distance(candidates[None], anchor.detach()[:, None])[0]
    assert after[0] < before[0]  # toward the positive candidate
    assert after[1] > before[1] and after[3] > before[3]  # away from negative ones


def test_clipping_stops_the_gradient_outside_the_trust_region():
    candidates = torch.tensor([[0.0], [1.0], [2.0]]).view(3, 1, 1)
    eps = 1e-3
    # Anchor 1 moved toward candidate 0: rho_0 > 1 + eps, rho_2 < 1 - eps.
    anchor = torch.tensor([[0.6]]).view(1, 1, 1).requires_grad_(True)

    def grad_for(adv):
        anchor.grad = None
        loss, stats = arcopo_step_loss(anchor, candidates, torch.tensor([1]), adv, clip_eps=eps)
        loss.backward()
        return anchor.grad.item(), stats

    # Positive advantage on the over-ratio candidate 0, negative on the under-ratio candidate 2:
    # both clipped in the advantage's direction, candidate 1 has A = 0: no gradient at all.
    g, stats = grad_for(torch.tensor([1.0, 0.0, -1.0]))
    assert g == 0.0 and stats.clip_fraction > 0
    # Opposite signs: the objective wants to undo the move, and clipping does not block that.
    g, _ = grad_for(torch.tensor([-1.0, 0.0, 1.0]))
    assert g != 0.0
    # Without clipping the first case does get a gradient.
    anchor.grad = None
    loss, _ = arcopo_step_loss(anchor, candidates, torch.tensor([1]), torch.tensor([1.0, 0.0, -1.0]), clip_eps=1e9)
    loss.backward()
    assert anchor.grad.item() != 0.0


def test_symmetric_anchors():
    gen = torch.Generator().manual_seed(0)
    picks = symmetric_anchors(12, 4, gen)
    assert len(set(picks.tolist())) == 4 and all(0 <= i < 12 for i in picks.tolist())
    counts = torch.zeros(12)
    for _ in range(600):
        counts[symmetric_anchors(12, 4, gen)] += 1
    assert counts.min() > 120  # uniform: 200 expected per branch
    with pytest.raises(ValueError):
        symmetric_anchors(3, 4)


def test_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        arcopo_step_loss(torch.zeros(1, 2), torch.zeros(3, 2), torch.tensor([0]), torch.zeros(2))
    with pytest.raises(ValueError, match="reduction"):
        squared_distance(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), "max")
