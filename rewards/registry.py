"""Builds the reward models of a config (`rewards.models`; their specs are in common/config.py).

from rewards.registry import build_models
models = build_models(config)            # list of RewardModel
models[0].components, models[0](frames, prompts, fps=16.0)
"""

from __future__ import annotations

import torch

from common.config import Config, RewardModelSpec, reward_model_spec, reward_model_specs
from common.errors import RewardError
from rewards.base import RewardModel


class ToyReward(RewardModel):
    """The toy world's VQ/MQ/TA stand-ins and its held-out OOD score (rewards/toy.py)."""

    name = "toy"

    def __init__(self, names: list[str], prefix: str = ""):
        from rewards.toy import TOY_REWARDS

        unknown = [n for n in names if n not in TOY_REWARDS]
        if unknown:
            raise RewardError(f"rewards.terms: unknown toy reward(s) {unknown}; known: {sorted(TOY_REWARDS)}")
        self.names, self.prefix = list(names), prefix
        self.components = [prefix + n for n in names]

    def score(self, frames: torch.Tensor, prompts: list[str], fps: float) -> dict[str, torch.Tensor]:
        from common.video import from_uint8
        from rewards.toy import score

        try:
            out = score(from_uint8(frames), prompts, self.names)
        except ValueError as exc:
            raise RewardError(f"toy reward: {exc}") from None
        return {self.prefix + k: v for k, v in out.items()}


def build_model(spec: RewardModelSpec, term_names: list[str] | None = None) -> RewardModel:
    """One reward model from its spec (local files only)."""
    if spec.kind == "toy":
        names = spec.components
        if names is None:
            names = list(dict.fromkeys([n for n in (term_names or ["vq", "mq", "ta"])] + ["ood"]))
        return ToyReward(names, spec.prefix)
    if spec.kind == "videoalign":
        from rewards.videoalign import VideoAlignReward

        return VideoAlignReward(
            spec.path,
            base_model=spec.base_model,
            checkpoint_step=spec.checkpoint_step,
            device=spec.device,
            dtype=spec.dtype,
            fps=spec.fps,
            max_pixels=spec.max_pixels,
            min_pixels=spec.min_pixels,
            normalize=spec.normalize,
            prompt_template=spec.prompt_template,
            max_prompt_tokens=spec.max_prompt_tokens,
            prefix=spec.prefix,
        )
    from rewards.clip import ClipReward

    return ClipReward(
        spec.path,
        processor=spec.processor,
        device=spec.device,
        dtype=spec.dtype,
        num_frames=spec.num_frames,
        kind=spec.kind,
        prefix=spec.prefix,
        max_prompt_tokens=spec.max_prompt_tokens,
    )


class RemoteReward(RewardModel):
    """A reward model in its own Ray actor (its spec has a runtime_env: clashing dependencies)."""

    def __init__(self, spec: RewardModelSpec, term_names: list[str]):
        import ray

        host = ray.remote(ModelHost).options(
            runtime_env=spec.runtime_env, num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=0
        )
        self.actor = host.remote(spec.model_dump(mode="json"), term_names)
        self.components, self.name = ray.get(self.actor.describe.remote())
        self.timeout = 600.0

    def __call__(self, frames, prompts, fps=16.0):
        import ray

        return ray.get(self.actor.score.remote(frames, list(prompts), fps), timeout=self.timeout)


class ModelHost:
    """Ray actor body hosting one reward model."""

    def __init__(self, spec: dict, term_names: list[str]):
        self.model = build_model(reward_model_spec(spec), term_names)

    def describe(self):
        return self.model.components, self.model.name

    def score(self, frames, prompts, fps):
        return self.model(frames, prompts, fps)


def build_models(config: Config, remote: bool = True) -> list[RewardModel]:
    """Every configured model (the toy rewards if none are). Models with a runtime_env run in their
    own actor when `remote` and Ray is up. Every term must name a component some model declares."""
    # The out-of-domain terms are scored by the same servers, at evaluation (and, unasked, on every group).
    ood = config.run.out_of_domain
    term_names = [t.name for t in config.rewards.terms] + ([t.name for t in ood.terms] if ood else [])
    all_specs = reward_model_specs(config)
    if len(all_specs) > 1:  # the toy model then takes only the terms that are toy rewards
        from rewards.toy import TOY_REWARDS

        toy_terms = [n for n in term_names if n in TOY_REWARDS]
    else:
        toy_terms = term_names
    models: list[RewardModel] = []
    for spec in all_specs:
        names = toy_terms if spec.kind == "toy" else term_names
        if spec.runtime_env and remote:
            import ray

            if ray.is_initialized():
                models.append(RemoteReward(spec, names))
                continue
        models.append(build_model(spec, names))
    declared = [c for m in models for c in m.components]
    duplicated = sorted({c for c in declared if declared.count(c) > 1})
    if duplicated:
        raise RewardError(f"reward component(s) {duplicated} declared by two models; give one a `prefix`")
    missing = [n for n in term_names if n not in declared]
    if missing:
        raise RewardError(
            f"rewards.terms / run.out_of_domain.terms name {missing}, which no reward model declares; "
            f"declared: {declared}"
        )
    return models
