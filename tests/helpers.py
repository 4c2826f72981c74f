"""Plain helpers shared by several test files (fixtures live in conftest.py). Test files import from
here, never from each other."""

from __future__ import annotations

import torch

from common.dataflow.records import RolloutGroup


def group(seed: int, *, G: int = 2, C: int = 2, H: int = 2, W: int = 2, policy_version: int = 0) -> RolloutGroup:
    """A small random rollout group (2 steps, pivot 1), the same for the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    comps = {"vq": torch.rand(G, generator=gen), "ta": torch.rand(G, generator=gen)}
    return RolloutGroup(
        prompt=f"prompt {seed}",
        pivot=1,
        sigma=0.5,
        plan_seed=seed,
        fork_seed=seed + 1,
        policy_version=policy_version,
        prefix_latents=r(1, C, 1, H, W),
        pivot_inputs=r(G, 2, C, 1, H, W),
        pivot_predictions=r(G, 2, C, 1, H, W),
        pivot_latents=r(G, C, 1, H, W),
        rewards=comps["vq"] + 0.5 * comps["ta"],
        reward_components=comps,
        extra={"worker": "rollout-0", "seed": seed},
        group_id=f"group-{seed}",
    )
