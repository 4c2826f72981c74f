"""The weighted multi-reward total, refusing anything non-finite before it reaches a GRPO group."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from common.errors import RewardError
from common.evaluation import Scores

if TYPE_CHECKING:
    from common.config import Config
    from common.evaluation import EvalSet


def weighted_total(components: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum_name weight * component, per video. Every weighted component must be present, 1-D, finite."""
    missing = [name for name in weights if name not in components]
    if missing:
        raise RewardError(f"reward component(s) {missing} missing; got {sorted(components)}")
    total = None
    for name, weight in weights.items():
        value = components[name].float()
        if value.ndim != 1:
            raise RewardError(f"reward component {name!r} must be one score per video, got shape {tuple(value.shape)}")
        bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"reward component {name!r} is not finite for video(s) {bad}")
        total = weight * value if total is None else total + weight * value
    if total is None:
        raise RewardError("no reward terms configured")
    return total


def component_stats(components: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> dict[str, dict]:
    """Per component: mean, std, min, max over the videos (finite values only, with their count),
    and, for weighted ones, the weight and its contribution (weight * mean) to the total."""
    weights = weights or {}
    stats = {}
    for name, value in components.items():
        v = torch.as_tensor(value).detach().float().reshape(-1)
        finite = v[torch.isfinite(v)]
        n = finite.numel()
        entry = {
            "n": n,
            "non_finite": int(v.numel() - n),
            "mean": finite.mean().item() if n else float("nan"),
            "std": finite.std(unbiased=False).item() if n else float("nan"),
            "min": finite.min().item() if n else float("nan"),
            "max": finite.max().item() if n else float("nan"),
        }
        if name in weights:
            entry["weight"] = weights[name]
            entry["contribution"] = weights[name] * entry["mean"]
        stats[name] = entry
    return stats


class RewardCombiner:
    """The training reward: a weighted sum of named components (config `rewards.terms`), refusing
    missing or non-finite weighted components, with per-component statistics.

        combiner = RewardCombiner.from_config(config)      # or RewardCombiner({"vq": 1.0, "ta": 0.5})
        total, stats = combiner(components)                # total float32 [B]; stats per component
    """

    def __init__(self, weights: dict[str, float]):
        if not weights:
            raise RewardError("no reward terms configured")
        bad = [n for n, w in weights.items() if not isinstance(w, (int, float)) or w != w or abs(w) == float("inf")]
        if bad:
            raise RewardError(f"reward weight(s) of {bad} are not finite numbers")
        self.weights = dict(weights)

    @classmethod
    def from_config(cls, config: Config) -> RewardCombiner:
        weights: dict[str, float] = {}
        for term in config.rewards.terms:
            if term.name in weights:
                raise RewardError(f"rewards.terms: {term.name!r} listed twice")
            weights[term.name] = term.weight
        return cls(weights)

    def total(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_total(components, self.weights)

    def __call__(self, components: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, dict]]:
        total = self.total(components)
        stats = component_stats(components, self.weights)
        stats["total"] = component_stats({"total": total})["total"]
        return total, stats


def policy_scores(eval_set: EvalSet, per_video: dict[str, list[float]], config: Config) -> tuple[Scores, dict]:
    """A policy's Scores on the evaluation set (common/evaluation.py) from its per-video components:
    in-domain = the training reward (rewards.terms) on the in-domain videos, out-of-domain =
    run.out_of_domain.terms on the held-out videos (missing without it). Also every component's
    mean: in-domain videos under its name, held-out videos under "heldout/<name>"."""
    in_part, ood_part = eval_set.split(per_video)
    in_total = weighted_total(
        {k: torch.tensor(v) for k, v in in_part.items()}, RewardCombiner.from_config(config).weights
    )
    ood = config.run.out_of_domain
    if ood is not None and eval_set.out_of_domain:
        ood_weights = {t.name: t.weight for t in ood.terms}
        ood_values = weighted_total({k: torch.tensor(v) for k, v in ood_part.items()}, ood_weights).tolist()
    else:
        ood_values = []
    parts = {k: sum(v) / len(v) for k, v in in_part.items() if v}
    parts |= {f"heldout/{k}": sum(v) / len(v) for k, v in ood_part.items() if v}
    return Scores(in_total.tolist(), ood_values), parts
