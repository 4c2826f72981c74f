"""What a rollout worker does for one prompt: fork, decode, score, package (docs/method.md section 2).

Plain functions, no Ray: the Ray actor wraps them, the single-process toy loop calls them directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.dataflow.records import RolloutGroup
from common.model.policy import pixels_as_video  # noqa: F401  (re-exported for callers)
from common.model.sampler import StreamingSampler
from rewards.combine import weighted_total

# uint8 frames [B, F, H, W, 3] and their prompts -> reward components, one score per video
RewardFn = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]
# latent videos [B, C, F, h, w] -> uint8 frames [B, F', H, W, 3] on the CPU (common/model/policy.py)
DecodeFn = Callable[[torch.Tensor], torch.Tensor]


def collect_group(
    sampler: StreamingSampler,
    text: torch.Tensor,
    prompt: str,
    *,
    pivot: int,
    group_size: int,
    sigma: float,
    plan_seed: int,
    fork_seed: int,
    decode: DecodeFn,
    reward_fn: RewardFn,
    weights: dict[str, float],
    policy_version: int,
    adapter: str,
) -> RolloutGroup:
    """Fork one rollout of `prompt` into G neighbours, score the whole videos, return the record.

    Non-finite or missing rewards raise RewardError: the group is dropped loudly, never averaged.
    """
    group = sampler.fork(
        text, sampler.noise_plan(plan_seed), pivot=pivot, group_size=group_size, sigma=sigma, fork_seed=fork_seed
    )
    frames = decode(group.videos)
    components = {k: v.float().cpu() for k, v in reward_fn(frames, [prompt] * group_size).items()}
    total = weighted_total(components, weights)
    return RolloutGroup.from_fork(
        group,
        prompt=prompt,
        rewards=total,
        reward_components=components,
        policy_version=policy_version,
        adapter=adapter,
    )
