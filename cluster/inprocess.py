"""AR-CoPO in one process (no Ray, no Redis): the job's policy, reward models and evaluation set,
with the job's rollout (actors.rollout.collect_group), update (learner.update.arcopo_update) and
evaluation (common.evaluation) called directly. `bench.toy_alignment` measures alignment with it;
because it shares every piece with the distributed job, the two cannot drift apart.

    run = InProcessRun(load_config("configs/toy.yaml"))
    with adapters.reference_policy(run.model):
        before = run.evaluate()                       # Scores: in-domain and out-of-domain, per video
    run.train(adapters.ON_POLICY, lambda it: [run.collect(...)], iterations, clip_eps, seed)

What it leaves out is the distribution: no weight sync (one model), no staleness (strictly
on-policy), no replay buffer (a Python list of groups).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from actors.rollout import collect_group
from cluster.prompts import load_prompts
from common.evaluation import EvalSet, Scores, score_policy
from common.model import adapters
from common.model.policy import Policy
from learner.update import UpdateSettings, arcopo_update
from rewards.combine import RewardCombiner, policy_scores
from rewards.server import build_reward_models, score_batch

if TYPE_CHECKING:
    from common.config import Config
    from common.dataflow.records import RolloutGroup


class InProcessRun:
    """The job's pieces in one process, shared by every variant a bench trains."""

    def __init__(self, config: Config):
        self.config = config
        self.policy = Policy.from_config(config, role="rollout")
        self.model, self.sampler = self.policy.model, self.policy.sampler
        self.initial_adapters = {n: adapters.adapter_state_dict(self.model, n) for n in adapters.ADAPTERS}
        self.reward_models = build_reward_models(config)
        self.weights = RewardCombiner.from_config(config).weights
        self.train_prompts, self.heldout_prompts = load_prompts(config)
        self.eval_set = EvalSet.from_config(config, self.train_prompts, self.heldout_prompts)

    def reset(self) -> None:
        """Both adapters back to their initial weights."""
        for name, state in self.initial_adapters.items():
            adapters.load_adapter_state_dict(self.model, name, {k: v.clone() for k, v in state.items()})

    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Every reward component of uint8 videos, as a reward server scores them."""
        return score_batch(self.reward_models, frames, prompts, fps=self.config.rewards.video_fps)

    @torch.no_grad()
    def evaluate(self) -> Scores:
        """The active policy's Scores on the run's evaluation set (common/evaluation.py)."""
        e = self.eval_set
        per_video = score_policy(self.policy, e.prompts, e.seeds, self.score, self.config.run.eval_batch_size)
        return policy_scores(e, per_video, self.config)[0]

    def collect(self, prompt: str, rng: random.Random, version: int, adapter: str, pivot: int | None = None):
        """One forked group of `prompt` with the active policy, at a random pivot unless given."""
        a, s = self.config.algorithm, self.config.sampler
        pivot = rng.randrange(s.num_chunks) if pivot is None else pivot
        return collect_group(
            self.sampler,
            self.policy.text([prompt]),
            prompt,
            pivot=pivot,
            group_size=a.group_size,
            sigma=a.fork_sigma,
            plan_seed=rng.randrange(2**31),
            fork_seed=rng.randrange(2**31),
            decode=self.policy.decode,
            reward_fn=self.score,
            weights=self.weights,
            policy_version=version,
            adapter=adapter,
        )

    def train(
        self,
        adapter: str,
        groups_for_iteration: Callable[[int], list[RolloutGroup]],
        iterations: int,
        clip_eps: float,
        seed: int,
        reward_of: Callable[[RolloutGroup], torch.Tensor] = lambda g: g.rewards,
    ) -> list[float]:
        """Train `adapter`; returns the mean group reward of each iteration's batch (the learning curve
        of on-policy training; for a fixed buffer it only shows what was sampled)."""
        settings = UpdateSettings.from_config(self.config)
        settings.clip_eps = clip_eps
        params = adapters.train_adapter(self.model, adapter)
        learner = self.config.learner
        optimizer = torch.optim.AdamW(params, lr=learner.lr, weight_decay=learner.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        curve = []
        for it in tqdm(range(iterations), desc=adapter, leave=False):
            groups = groups_for_iteration(it)
            curve.append(sum(reward_of(g).mean().item() for g in groups) / len(groups))
            texts = [self.policy.text([g.prompt]) for g in groups]
            arcopo_update(
                self.sampler, groups, [reward_of(g) for g in groups], texts, params, optimizer, settings, generator
            )
        self.model.requires_grad_(False)
        return curve
