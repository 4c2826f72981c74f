"""The AR-CoPO objective on the pivot chunk (docs/method.md sections 2.7 and 3), line by line.

For one denoising step t of the pivot chunk, G candidates x0_hat_t^i from the behaviour policy and
B anchors k (branch indices):

    a_theta = F_theta(x_t^k, h_{p-1}, t)                 # anchor_predictions, the only grad path
    d_i     = || x0_hat_t^i - a_theta ||^2               # distance to every candidate
    d_i_old = || x0_hat_t^i - x0_hat_t^k ||^2            # same, behaviour prediction as anchor
    log pi(i|k), log pi_old(i|k) = log_softmax(-d / tau), log_softmax(-d_old / tau)
    rho_i   = exp(log pi(i|k) - log pi_old(i|k))
    J_k,t   = (1/G) sum_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i)
    loss    = -mean over anchors (and, by the caller, over steps) of J

No KL term. Distances are on clean predictions, reduced by mean (DEFAULT) or sum over elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import RewardError


def group_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, quasi_norm: bool = False, q: float = 0.8
) -> torch.Tensor:
    """A_i = (r_i - mean r) / (std r + eps) within one group; optionally A_i / (sum_k |A_k|^q)^(1/q).

    std is the population standard deviation (the group is the whole population being compared).
    A non-finite reward is refused: one NaN would silently poison every advantage of its group.
    """
    if rewards.ndim != 1 or rewards.numel() < 2:
        raise RewardError(f"a group needs a 1-D reward vector of at least 2 branches, got shape {tuple(rewards.shape)}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"non-finite reward for branch(es) {bad}: {rewards[bad].tolist()}")
    rewards = rewards.double()
    advantages = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
    if quasi_norm:
        norm = advantages.abs().pow(q).sum().pow(1.0 / q)
        advantages = advantages / norm.clamp_min(eps)
    return advantages.float()


def squared_distance(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """||a - b||^2 over all but the leading dims a and b broadcast to, reduced by mean or sum."""
    diff = (a - b).square().flatten(2)
    if reduction == "mean":
        return diff.mean(-1)
    if reduction == "sum":
        return diff.sum(-1)
    raise ValueError(f"distance reduction must be 'mean' or 'sum', got {reduction!r}")


@dataclass
class LossStats:
    loss: float
    clip_fraction: float  # share of (anchor, candidate) ratios outside [1 - eps, 1 + eps]
    ratio_mean: float
    ratio_max_dev: float  # max |rho - 1|


def arcopo_step_loss(
    anchor_predictions: torch.Tensor,
    candidates: torch.Tensor,
    anchors: torch.Tensor,
    advantages: torch.Tensor,
    *,
    tau: float = 1.0,
    clip_eps: float = 1e-4,
    reduction: str = "mean",
) -> tuple[torch.Tensor, LossStats]:
    """-mean_k J_k,t for one step t.

    anchor_predictions: a_theta for each anchor, [B, ...] (requires grad).
    candidates: the behaviour policy's x0_hat_t^i for every branch, [G, ...] (constants).
    anchors: branch index k of each anchor, [B] (long).
    advantages: A_i, [G].
    """
    candidates = candidates.detach()
    G = candidates.shape[0]
    if advantages.shape != (G,):
        raise ValueError(f"advantages must have shape ({G},), got {tuple(advantages.shape)}")
    if anchor_predictions.shape[0] != anchors.shape[0]:
        raise ValueError("one anchor prediction per anchor index")
    advantages = advantages.to(anchor_predictions.dtype).detach()

    d = squared_distance(candidates[None], anchor_predictions[:, None], reduction)  # [B, G]
    d_old = squared_distance(candidates[None], candidates[anchors][:, None], reduction)  # [B, G]
    log_pi = torch.log_softmax(-d / tau, dim=1)
    log_pi_old = torch.log_softmax(-d_old / tau, dim=1)
    rho = torch.exp(log_pi - log_pi_old)

    unclipped = rho * advantages
    clipped = rho.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    J = torch.minimum(unclipped, clipped).mean(dim=1)  # (1/G) sum_i, per anchor
    loss = -J.mean()

    with torch.no_grad():
        outside = ((rho < 1.0 - clip_eps) | (rho > 1.0 + clip_eps)).float()
        stats = LossStats(
            loss=loss.item(),
            clip_fraction=outside.mean().item(),
            ratio_mean=rho.mean().item(),
            ratio_max_dev=(rho - 1.0).abs().max().item(),
        )
    return loss, stats


def symmetric_anchors(group_size: int, num_anchors: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """B distinct branch indices drawn uniformly without replacement.

    Drawing anchors uniformly (not, say, the best B) keeps the estimator symmetric over the group:
    every branch is as likely to anchor as to be a candidate.
    """
    if not 1 <= num_anchors <= group_size:
        raise ValueError(f"need 1 <= num_anchors ({num_anchors}) <= group_size ({group_size})")
    return torch.randperm(group_size, generator=generator)[:num_anchors]
