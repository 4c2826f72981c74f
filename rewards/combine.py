"""The weighted multi-reward total, refusing anything non-finite before it reaches a GRPO group."""

from __future__ import annotations

import torch

from common.errors import RewardError


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
