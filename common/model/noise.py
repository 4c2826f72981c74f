"""Every random tensor of a rollout, owned by one object and derived from seeds.

docs/method.md (section 2) is precise about which noise the G branches of a fork share: everything except the pivot
chunk's initial noise, which is perturbed per branch as e_i = sqrt(1 - sigma^2) e* + sigma d_i.
Deriving each tensor from (seed, kind, chunk, step) rather than from one running generator makes
that sharing exact by construction, lets any tensor be regenerated on demand (a learner or a
replay entry needs only the seeds), and gives the same numbers on CPU and GPU.

Every tensor is drawn on the host by a CPU generator, whatever the model's device: a CUDA generator
seeded alike draws other numbers (Philox, not the CPU's Mersenne Twister), so drawing on the device
would make a plan's noise depend on where it ran. `draw_chunk` draws all of one chunk's noise (its
initial noise, its solver noises and its context noise) on the host and moves it in one copy, from
pinned memory and without blocking when the device is a GPU, instead of one synchronous copy per
denoising step; the values are the plan's, bit for bit, on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class ChunkNoise:
    """One chunk's noise on the model's device: `initial` [B or 1, C, f, H, W], `solver[s]` for the
    re-noising after step s (T - 1 of them), `context` (None unless asked for)."""

    initial: torch.Tensor
    solver: tuple[torch.Tensor, ...]
    context: torch.Tensor | None


def to_device(tensors: Sequence[torch.Tensor], device: torch.device | str | None) -> list[torch.Tensor]:
    """Host tensors on `device` in one copy (pinned and non-blocking to a GPU); unchanged on the host."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if all(t.device == device for t in tensors):
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    moved = flat.to(device, non_blocking=device.type == "cuda")
    return [m.view(t.shape) for m, t in zip(moved.split([t.numel() for t in tensors]), tensors, strict=True)]


def draw_chunk(noise: Any, chunk: int, num_steps: int, context: bool, device: torch.device | str | None) -> ChunkNoise:
    """Every noise tensor chunk `chunk` needs over `num_steps` denoising steps (and its context pass,
    with `context`), drawn on the host from `noise` (a NoisePlan, a BranchNoise or any object with
    their `initial` / `solver` / `context` methods) and moved to `device` in one copy."""
    host = [noise.initial(chunk)] + [noise.solver(chunk, step) for step in range(num_steps - 1)]
    if context:
        host.append(noise.context(chunk))
    moved = to_device(host, device)
    return ChunkNoise(moved[0], tuple(moved[1:num_steps]), moved[num_steps] if context else None)
