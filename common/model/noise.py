"""Every random tensor of a rollout, owned by one object and derived from seeds.

docs/method.md (section 2) is precise about which noise the G branches of a fork share: everything except the pivot
chunk's initial noise, which is perturbed per branch as e_i = sqrt(1 - sigma^2) e* + sigma d_i.
Deriving each tensor from (seed, kind, chunk, step) rather than from one running generator makes
that sharing exact by construction, lets any tensor be regenerated on demand (a learner or a
replay entry needs only the seeds), and gives the same numbers on CPU and GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.seeds import derive_seed


def seeded_normal(shape: tuple[int, ...], *parts: object) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(repr(parts)))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@dataclass(frozen=True)
class NoisePlan:
    """The noise of a batch of independent rollouts, one seed per sample.

    chunk_shape is (channels, frames_per_chunk, height, width) in latent space.
    """

    seeds: tuple[int, ...]
    chunk_shape: tuple[int, int, int, int]

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    def _draw(self, kind: str, chunk: int, step: int, device, dtype) -> torch.Tensor:
        noise = torch.stack([seeded_normal(self.chunk_shape, seed, kind, chunk, step) for seed in self.seeds])
        return noise.to(device=device, dtype=dtype)

    def initial(self, chunk: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """Initial noise of a chunk, [batch, C, f, H, W]."""
        return self._draw("initial", chunk, 0, device, dtype)

    def solver(self, chunk: int, step: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """Noise that re-noises the x0 prediction of step `step` to step `step + 1`."""
        return self._draw("solver", chunk, step, device, dtype)

    def context(self, chunk: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """Noise of the cache-writing pass (used only when context_noise > 0)."""
        return self._draw("context", chunk, 0, device, dtype)


@dataclass(frozen=True)
class BranchNoise:
    """The noise of some branches of a fork of a single-rollout plan at chunk `pivot`.

    Every tensor but the pivot's initial noise comes from `plan` unchanged (batch 1, broadcast over
    the branches). `branches` are branch indices in 0..G-1, so a fork can run in sub-batches and
    still give each branch the same d_i.
    """

    plan: NoisePlan
    pivot: int
    sigma: float
    fork_seed: int
    branches: tuple[int, ...]

    def __post_init__(self):
        if self.plan.batch_size != 1:
            raise ValueError("a fork continues one rollout: its noise plan must have exactly one seed")
        if not 0.0 <= self.sigma <= 1.0:
            raise ValueError(f"fork sigma must lie in [0, 1], got {self.sigma}")

    @property
    def batch_size(self) -> int:
        return len(self.branches)

    def directions(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """d_i ~ N(0, I) for the branches, [n, C, f, H, W]."""
        d = torch.stack(
            [seeded_normal(self.plan.chunk_shape, self.fork_seed, "fork", self.pivot, i) for i in self.branches]
        )
        return d.to(device=device, dtype=dtype)

    def initial(self, chunk: int, device=None, dtype=torch.float32) -> torch.Tensor:
        base = self.plan.initial(chunk, device, dtype)
        if chunk != self.pivot:
            return base
        return math.sqrt(1.0 - self.sigma**2) * base + self.sigma * self.directions(device, dtype)

    def solver(self, chunk: int, step: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return self.plan.solver(chunk, step, device, dtype)

    def context(self, chunk: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return self.plan.context(chunk, device, dtype)
