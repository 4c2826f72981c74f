"""The one evaluation of a policy (docs/method.md section 5), shared by the job's driver, the rollout
workers, `cluster.evaluate` and the in-process run the toy bench uses, so their numbers cannot drift:

    eval_set = EvalSet.from_config(config, train_prompts, heldout_prompts)
    per_video = score_policy(policy, eval_set.prompts, eval_set.seeds, score, batch_size)
    scores = rewards.combine.policy_scores(eval_set, per_video, config)    # Scores with standard errors

The evaluation set is fixed for a run: the first `run.eval_prompts` training prompts (the in-domain
score, on the training reward) and the first `run.out_of_domain.num_prompts` held-out prompts (the
out-of-domain score, on reward terms the run never trains on), each with the noise seeds
EVAL_SEED_BASE + 0 .. run.eval_seeds - 1. Every policy sees the same (prompt, seed) pairs, so two
policies' per-video scores pair up and their difference has a small, honest standard error.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from common.config import Config
    from common.model.policy import Policy

# Evaluation videos' noise seeds start here; training jobs derive theirs from the run seed
# (common/seeds.py), so evaluation noise is never a training rollout's.
EVAL_SEED_BASE = 10_000


def eval_seeds(count: int) -> range:
    return range(EVAL_SEED_BASE, EVAL_SEED_BASE + count)


@dataclass(frozen=True)
class EvalSet:
    """(prompt, noise seed) pairs: the in-domain part, then the out-of-domain part."""

    in_domain: tuple[tuple[str, int], ...]
    out_of_domain: tuple[tuple[str, int], ...]

    @classmethod
    def from_config(cls, config: Config, train_prompts: Sequence[str], heldout_prompts: Sequence[str]) -> EvalSet:
        r = config.run
        ood = r.out_of_domain
        heldout = list(heldout_prompts[: ood.num_prompts]) if ood is not None else []
        if ood is not None and not heldout:
            raise ValueError("run.out_of_domain: no held-out prompts to score the out-of-domain terms on")
        ood_seeds = ood.seeds if ood is not None and ood.seeds is not None else r.eval_seeds
        return cls(
            tuple((p, s) for p in train_prompts[: r.eval_prompts] for s in eval_seeds(r.eval_seeds)),
            tuple((p, s) for p in heldout for s in eval_seeds(ood_seeds)),
        )

    @property
    def pairs(self) -> tuple[tuple[str, int], ...]:
        return self.in_domain + self.out_of_domain

    @property
    def prompts(self) -> list[str]:
        return [p for p, _ in self.pairs]

    @property
    def seeds(self) -> list[int]:
        return [s for _, s in self.pairs]

    def split(self, per_video: dict[str, list[float]]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Per-video components of the whole set -> (in-domain part, out-of-domain part)."""
        n = len(self.in_domain)
        if any(len(v) != len(self.pairs) for v in per_video.values()):
            raise ValueError(f"per-video scores for {len(self.pairs)} videos expected")
        return {k: v[:n] for k, v in per_video.items()}, {k: v[n:] for k, v in per_video.items()}


ScoreFn = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]


@torch.no_grad()
def score_policy(
    policy: Policy, prompts: list[str], seeds: list[int], score: ScoreFn, batch_size: int
) -> dict[str, list[float]]:
    """Every reward component of each (prompt, seed) video of the policy's active mode, per video in
    order. `score` takes uint8 frames [B, F, H, W, 3] and their prompts (a reward server, or models
    in this process); videos are made `batch_size` at a time (`run.eval_batch_size`)."""
    out: dict[str, list[float]] = {}
    for batch_prompts, frames in policy.videos(prompts, seeds, batch_size):
        for name, values in score(frames, batch_prompts).items():
            out.setdefault(name, []).extend(torch.as_tensor(values).float().reshape(-1).tolist())
    return out


@dataclass(frozen=True)
class Score:
    """One score of a policy: its per-video values on the evaluation set (a single number when only
    a mean is known, as for a published result)."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, value: float | Sequence[float] | Score) -> Score:
        if isinstance(value, Score):
            return value
        if isinstance(value, (int, float)):
            return cls((float(value),))
        return cls(tuple(float(v) for v in value))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def stderr(self) -> float:
        """Standard error of the mean over videos (NaN for fewer than two)."""
        return statistics.stdev(self.values) / math.sqrt(self.n) if self.n > 1 else math.nan

    @property
    def missing(self) -> bool:
        return not self.values or any(math.isnan(v) for v in self.values)

    def margin_over(self, base: Score) -> tuple[float, float]:
        """(mean - base mean, its standard error). On the same evaluation set the videos pair up
        (same prompt, same noise), so the error is that of the per-video differences; otherwise the
        two errors add in quadrature."""
        diff = self.mean - base.mean
        if self.n == base.n and self.n > 1:
            deltas = [a - b for a, b in zip(self.values, base.values, strict=True)]
            return diff, statistics.stdev(deltas) / math.sqrt(self.n)
        return diff, math.hypot(self.stderr, base.stderr)

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.stderr:.4f}" if self.n > 1 else f"{self.mean:.4f}"


@dataclass(frozen=True)
class Scores:
    """A policy's in-domain score (the training reward on its evaluation prompts) and out-of-domain
    score (terms never trained on, on held-out prompts). Plain numbers are taken as one-value scores."""

    in_domain: Score
    out_of_domain: Score

    def __init__(self, in_domain, out_of_domain):
        object.__setattr__(self, "in_domain", Score.of(in_domain))
        object.__setattr__(self, "out_of_domain", Score.of(out_of_domain))

    def as_row(self) -> dict:
        """JSON-ready: {"in_domain": [mean, stderr], "out_of_domain": [mean, stderr]}."""
        return {
            "in_domain": [self.in_domain.mean, self.in_domain.stderr],
            "out_of_domain": [self.out_of_domain.mean, self.out_of_domain.stderr],
        }
