"""Plain helpers shared by several test files (fixtures live in conftest.py). Test files import from
here, never from each other."""

from __future__ import annotations

import torch

from common.dataflow.records import RolloutGroup

# A toy job small enough for several actors on 2 cores: tiny evaluations, groups of 4, half a CPU per
# role. The cluster test files add the phases and lengths they need.
SMALL_TOY_JOB = [
    "metrics.port=0",
    "run.eval_prompts=2",
    "run.eval_seeds=1",
    "run.out_of_domain.num_prompts=2",
    "run.out_of_domain.seeds=1",
    "run.sample_prompts=1",
    "rollout.prompts_per_iteration=2",
    "algorithm.group_size=4",
    "algorithm.num_anchors=2",
    "sampler.fork_batch_size=4",
    "rollout.num_cpus_per_worker=0.5",
    "rewards.num_cpus_per_server=0.5",
    "learner.num_cpus_per_worker=0.5",
    "run.merge_scales=[0.0,1.0]",
]


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
