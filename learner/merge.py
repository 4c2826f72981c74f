"""Model selection for merged adapters (docs/method.md section 5): the "dual improvement" rule, in
one place for the driver, `cluster.evaluate` and the toy bench.

A merge scale s (W = W_base + dW_semi + s dW_on) counts as aligned only if BOTH the in-domain
reward AND the out-of-domain score improve over the base model (a tie on either does not pass);
of the passing scales the largest wins (more on-policy alignment, still no collateral damage).
A missing score is an error, not a failed comparison: the config refuses a merge without an
out-of-domain score at load, so reaching here without one is a bug to report, not to hide.
"""

from __future__ import annotations

from common.evaluation import Score, Scores

__all__ = ["Scores", "dual_improvement", "pick_merge_scale", "unresolved_margins"]


def _check(scores: Scores, label: str) -> None:
    for name in ("in_domain", "out_of_domain"):
        if getattr(scores, name).missing:
            raise ValueError(f"dual-improvement rule: the {label}'s {name.replace('_', '-')} score is missing")


def dual_improvement(base: Scores, candidate: Scores, tolerance: float = 0.0) -> bool:
    """In-domain strictly up; out-of-domain strictly up, or within `tolerance` below the base (0 by
    default, as the method states it; a noisy benchmark may be given some)."""
    _check(base, "base")
    _check(candidate, "candidate")
    in_up = candidate.in_domain.mean > base.in_domain.mean
    if tolerance > 0:
        ood_ok = candidate.out_of_domain.mean >= base.out_of_domain.mean - tolerance
    else:
        ood_ok = candidate.out_of_domain.mean > base.out_of_domain.mean
    return in_up and ood_ok


def pick_merge_scale(base: Scores, by_scale: dict[float, Scores], tolerance: float = 0.0) -> float | None:
    """The largest scale whose merged model passes `dual_improvement`, or None if none does."""
    passing = [s for s, scores in by_scale.items() if dual_improvement(base, scores, tolerance)]
    return max(passing) if passing else None


def unresolved_margins(base: Scores, candidate: Scores, z: float = 2.0) -> list[str]:
    """The scores whose margin over the base is within `z` standard errors (paired over the shared
    evaluation videos): a verdict resting on them is not resolved by this evaluation set."""
    out = []
    for name in ("in_domain", "out_of_domain"):
        mine: Score = getattr(candidate, name)
        diff, err = mine.margin_over(getattr(base, name))
        if not err == err or abs(diff) <= z * err:  # NaN error (one video, or a published mean): unknown
            out.append(f"{name.replace('_', '-')} margin {diff:+.4f} ± {err:.4f}")
    return out
