"""One AR-CoPO update on a batch of forked groups (docs/method.md section 3), for any adapter.

The learner never receives a KV cache: it rebuilds h_{p-1} from each group's prefix latents by
replaying the rollout's context passes without grad, then backpropagates only through the anchors'
predictions on the pivot chunk. The
behaviour policy's predictions recorded by the rollout are the candidates and pi_old, for every
inner optimiser step (the data is not re-collected between them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from common.model.sampler import StreamingSampler
from learner.loss import arcopo_step_loss, group_advantages, symmetric_anchors

if TYPE_CHECKING:
    from common.config import Config


class PivotData(Protocol):
    """What an update needs of a group (a ForkedGroup or a decoded replay record provides it)."""

    pivot: int
    prefix_latents: torch.Tensor  # [1, C, pivot * f, H, W]
    pivot_inputs: torch.Tensor  # [G, T, C, f, H, W]
    pivot_predictions: torch.Tensor  # [G, T, C, f, H, W]


@dataclass
class UpdateStats:
    loss: float
    clip_fraction: float
    ratio_max_dev: float
    grad_norm: float
    inner_steps: int


@dataclass
class UpdateSettings:
    num_anchors: int = 4
    tau: float = 1.0
    clip_eps: float = 1e-4
    distance_reduction: str = "mean"
    trained_steps: Sequence[int] | None = None
    inner_steps: int = 2
    grad_clip: float = 1.0
    advantage_eps: float = 1e-6
    quasi_norm: bool = False
    quasi_norm_q: float = 0.8
    anchor_micro_batch: int | None = None

    @classmethod
    def from_config(cls, config: Config) -> UpdateSettings:
        a = config.algorithm
        return cls(
            num_anchors=a.num_anchors,
            tau=a.tau,
            clip_eps=a.clip_eps,
            distance_reduction=a.distance_reduction,
            trained_steps=a.trained_steps,
            inner_steps=a.inner_steps,
            grad_clip=config.learner.grad_clip,
            advantage_eps=a.advantage_eps,
            quasi_norm=a.quasi_norm,
            quasi_norm_q=a.quasi_norm_q,
            anchor_micro_batch=config.learner.anchor_micro_batch,
        )


def arcopo_update(
    sampler: StreamingSampler,
    groups: Sequence[PivotData],
    rewards: Sequence[torch.Tensor],
    texts: Sequence[torch.Tensor],
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    settings: UpdateSettings,
    generator: torch.Generator | None = None,
    *,
    anchor_generators: Sequence[torch.Generator] | None = None,
    total_groups: int | None = None,
    reduce_grads: Callable[[list[torch.nn.Parameter]], None] | None = None,
) -> UpdateStats:
    """`settings.inner_steps` optimiser steps on the loss averaged over groups, anchors and steps.

    Data parallelism: each learner passes its shard of the global batch, `total_groups` (the global
    batch size, so shards of different sizes weigh each group equally), `reduce_grads` (a SUM
    all-reduce, run before clipping so every rank clips the same global gradient) and one anchor
    generator per group seeded by the group's global index, so the anchors do not depend on the sharding.

    Memory: one group's cache h_{p-1} is alive at a time. It is rebuilt for every inner step (a
    no-grad pass over the prefix, cheap beside B x T forward+backward passes) from the weights the
    update started with, so every inner step sees the same constant cache as the first.
    """
    device = sampler.device
    advantages = [
        group_advantages(r, settings.advantage_eps, settings.quasi_norm, settings.quasi_norm_q).to(device)
        for r in rewards
    ]
    num_steps = sampler.scheduler.num_steps
    steps = list(settings.trained_steps) if settings.trained_steps is not None else list(range(num_steps))
    if anchor_generators is None:
        anchor_generators = [generator] * len(groups)
    anchors = [
        symmetric_anchors(g.pivot_inputs.shape[0], settings.num_anchors, gen)
        for g, gen in zip(groups, anchor_generators, strict=True)
    ]
    denominator = (total_groups if total_groups is not None else len(groups)) * len(steps)
    micro = settings.anchor_micro_batch or settings.num_anchors
    start_weights = [p.detach().clone() for p in params] if settings.inner_steps > 1 else None

    total = clip = dev = norm = 0.0
    for inner in range(settings.inner_steps):
        optimizer.zero_grad(set_to_none=True)
        losses, clips, devs = [], [], []
        for group, text, adv, k in zip(groups, texts, advantages, anchors, strict=True):
            text = text.to(device)
            with _weights(params, start_weights if inner > 0 else None):
                cache = sampler.rebuild_cache(text, group.prefix_latents)
            for step in steps:
                candidates = group.pivot_predictions[:, step].to(device)
                step_loss = step_clip = step_dev = 0.0
                # Anchors in micro-batches: J is a mean over anchors, so each micro-batch's loss
                # weighted by its share of the anchors sums to the same gradient.
                for first in range(0, len(k), micro):
                    part = k[first : first + micro]
                    inputs = group.pivot_inputs[part, step].to(device)
                    a_theta = sampler.predict_x0(inputs, step, group.pivot, text, cache)
                    loss, stats = arcopo_step_loss(
                        a_theta,
                        candidates,
                        part.to(device),
                        adv,
                        tau=settings.tau,
                        clip_eps=settings.clip_eps,
                        reduction=settings.distance_reduction,
                    )
                    share = len(part) / len(k)
                    # Backward per micro-batch keeps one micro-batch's activations alive at a time.
                    (loss * share / denominator).backward()
                    step_loss += stats.loss * share
                    step_clip += stats.clip_fraction * share
                    step_dev = max(step_dev, stats.ratio_max_dev)
                losses.append(step_loss)
                clips.append(step_clip)
                devs.append(step_dev)
            del cache
        if reduce_grads is not None:
            reduce_grads(params)
        norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip).item()
        optimizer.step()
        if losses:  # a data-parallel rank may hold no group this step; it still joins the all-reduce
            total, clip, dev = sum(losses) / len(losses), sum(clips) / len(clips), max(devs)
    return UpdateStats(
        loss=total, clip_fraction=clip, ratio_max_dev=dev, grad_norm=norm, inner_steps=settings.inner_steps
    )


@contextlib.contextmanager
def _weights(params: list[torch.nn.Parameter], values: list[torch.Tensor] | None) -> Iterator[None]:
    """Temporarily give `params` other values (None: leave them). The storages are swapped, not
    copied: at real size an adapter is 0.35 GB of fp32, and no-grad passes only read them."""
    if values is None:
        yield
        return
    current = [p.data for p in params]
    for p, v in zip(params, values, strict=True):
        p.data = v
    try:
        yield
    finally:
        for p, v in zip(params, current, strict=True):
            p.data = v
