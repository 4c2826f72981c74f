"""The typed messages the driver sends and receives: small, JSON-able, no tensors.

A `GroupJob` carries every seed the group depends on, so the group is a function of (job, weights):
whichever rollout worker runs it, and however many there are, the same job at the same weight
version yields the same group.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from common.seeds import derive_seed


@dataclass(frozen=True)
class GroupJob:
    job_id: int
    phase: str  # "reference" (pi_ref, into the replay buffer) or "on_policy" (straight to the learner)
    prompt: str
    pivot: int
    plan_seed: int
    fork_seed: int
    mode: str  # the policy that rolls out: "reference" or an adapter name


@dataclass
class GroupSummary:
    """What the driver learns of a finished group: enough for scheduling, staleness and metrics."""

    job_id: int
    phase: str
    group_id: str
    policy_version: int
    worker: str
    reward_mean: float
    reward_std: float
    components: dict[str, float] = field(default_factory=dict)
    rollout_seconds: float = 0.0
    reward_seconds: float = 0.0
    replay_id: int | None = None
    record_bytes: int = 0  # the group's record (RolloutGroup.to_bytes), to the learner or into Redis


def job_rng(run_seed: int, phase: str, job_id: int) -> random.Random:
    """A generator that depends only on (seed, phase, job), never on who asks or in which order."""
    return random.Random(derive_seed(f"{run_seed}/{phase}/{job_id}", bits=64))


def make_job(run_seed: int, phase: str, job_id: int, prompts: list[str], num_chunks: int, mode: str) -> GroupJob:
    rng = job_rng(run_seed, phase, job_id)
    return GroupJob(
        job_id=job_id,
        phase=phase,
        prompt=rng.choice(prompts),
        pivot=rng.randrange(num_chunks),
        plan_seed=rng.randrange(2**31),
        fork_seed=rng.randrange(2**31),
        mode=mode,
    )
