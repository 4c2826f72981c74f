"""Model selection for merged adapters (docs/method.md section 5): the "dual improvement" rule.

A merge scale s (W = W_base + dW_semi + s dW_on) counts as aligned only if the in-domain reward
improves over the base model AND the out-of-domain score does not fall; of the passing scales the
largest wins (more on-policy alignment, still no collateral damage).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scores:
    in_domain: float  # e.g. VideoAlign overall, or the toy world's trained reward
    out_of_domain: float  # e.g. VBench total, or the toy world's held-out score


def dual_improvement(base: Scores, candidate: Scores, tolerance: float = 0.0) -> bool:
    """In-domain strictly up, out-of-domain not down (beyond `tolerance`, for noisy benchmarks)."""
    return candidate.in_domain > base.in_domain and candidate.out_of_domain >= base.out_of_domain - tolerance


def pick_merge_scale(base: Scores, by_scale: dict[float, Scores], tolerance: float = 0.0) -> float | None:
    """The largest scale whose merged model passes `dual_improvement`, or None if none does."""
    passing = [s for s, scores in by_scale.items() if dual_improvement(base, scores, tolerance)]
    return max(passing) if passing else None
