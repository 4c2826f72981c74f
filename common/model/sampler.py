"""Streaming few-step sampling, forking, and the cache rebuild: docs/method.md sections 1 and 2.

The sampling loop is written out in `StreamingSampler.stream` the way diffusers pipelines write
theirs: for each chunk, T consistency steps (predict x0, re-noise with solver noise), then one
context pass on the finished chunk that writes its keys/values into the cache. It yields each chunk
as soon as it is done, so a caller can decode and show it while the next one is generated.

`fork` is AR-CoPO's exploration: one shared prefix, then G branches that differ only in the pivot
chunk's initial noise, each recording its pivot chunk's per-step inputs x_t and predictions x0_hat.

Chunk indices are 0-based here (docs/method.md counts from 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm.auto import tqdm

from common.model.causal_wan import CausalWanTransformer3DModel, KVCache
from common.model.noise import BranchNoise, NoisePlan, draw_chunk, to_device
from common.model.scheduler import FewStepFlowScheduler

if TYPE_CHECKING:
    from common.config import Config


class NoiseSource(Protocol):
    batch_size: int

    def initial(self, chunk: int, device=None, dtype=torch.float32) -> torch.Tensor: ...
    def solver(self, chunk: int, step: int, device=None, dtype=torch.float32) -> torch.Tensor: ...
    def context(self, chunk: int, device=None, dtype=torch.float32) -> torch.Tensor: ...


@dataclass
class ChunkOutput:
    chunk: int
    latents: torch.Tensor  # the clean chunk, [B, C, f, H, W]
    # Only for recorded chunks: per step, the input x_t and the prediction x0_hat, [B, T, C, f, H, W].
    inputs: torch.Tensor | None = None
    predictions: torch.Tensor | None = None


@dataclass
class ForkedGroup:
    """G neighbours of one rollout, forked at `pivot` (docs/method.md section 2, steps 1-5)."""

    pivot: int
    sigma: float
    plan_seed: int
    fork_seed: int
    prefix_latents: torch.Tensor  # chunks before the pivot, shared: [1, C, pivot * f, H, W]
    videos: torch.Tensor  # whole latent videos, prefix included: [G, C, F, H, W]
    pivot_inputs: torch.Tensor  # x_t^i: [G, T, C, f, H, W]
    pivot_predictions: torch.Tensor  # x0_hat_t^i of the behaviour policy: [G, T, C, f, H, W]
    base_noise: torch.Tensor  # e*: [1, C, f, H, W]
    branch_noise: torch.Tensor  # e_i: [G, C, f, H, W]

    @property
    def group_size(self) -> int:
        return self.videos.shape[0]


class StreamingSampler:
    def __init__(
        self,
        model: CausalWanTransformer3DModel,
        scheduler: FewStepFlowScheduler,
        *,
        num_chunks: int,
        frames_per_chunk: int,
        latent_height: int,
        latent_width: int,
        local_attn_frames: int | None = None,
        sink_frames: int = 0,
        fork_batch_size: int = 12,
        progress: bool = False,
        preallocate_cache: bool = True,
    ):
        self.model = model
        self.scheduler = scheduler
        self.num_chunks = num_chunks
        self.frames_per_chunk = frames_per_chunk
        self.latent_height = latent_height
        self.latent_width = latent_width
        self.local_attn_frames = local_attn_frames
        self.sink_frames = sink_frames
        self.fork_batch_size = fork_batch_size
        self.progress = progress
        # Caches keep K/V in preallocated per-block buffers written in place (KVCache.capacity_frames);
        # False: the concatenating path at every forward (what benchmarks compare against).
        self.preallocate_cache = preallocate_cache

    @classmethod
    def from_config(
        cls, model: CausalWanTransformer3DModel, config: Config, progress: bool = False
    ) -> StreamingSampler:
        s = config.sampler
        _, h, w = config.latent_shape
        scheduler = FewStepFlowScheduler(s.denoising_steps, s.shift, s.num_train_timesteps, s.context_noise)
        return cls(
            model,
            scheduler,
            num_chunks=s.num_chunks,
            frames_per_chunk=s.frames_per_chunk,
            latent_height=h,
            latent_width=w,
            local_attn_frames=s.local_attn_frames,
            sink_frames=s.sink_frames,
            fork_batch_size=s.fork_batch_size,
            progress=progress,
        )

    # -- shapes and helpers -------------------------------------------------------------------

    @property
    def chunk_shape(self) -> tuple[int, int, int, int]:
        return (self.model.config.in_channels, self.frames_per_chunk, self.latent_height, self.latent_width)

    @property
    def num_frames(self) -> int:
        return self.num_chunks * self.frames_per_chunk

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    def noise_plan(self, *seeds: int) -> NoisePlan:
        return NoisePlan(tuple(seeds), self.chunk_shape)

    def new_cache(self, capacity_frames: int | None = None) -> KVCache:
        """An empty cache. Global attention: with room for `capacity_frames` (default: the whole
        video), so every no-grad forward writes its chunk's K/V in place; local attention evicts,
        and concatenates instead."""
        preallocate = self.preallocate_cache and self.local_attn_frames is None
        return KVCache(
            num_blocks=len(self.model.blocks),
            tokens_per_frame=self.model.tokens_per_frame(self.latent_height, self.latent_width),
            local_attn_frames=self.local_attn_frames,
            sink_frames=self.sink_frames,
            capacity_frames=(capacity_frames or self.num_frames) if preallocate else None,
        )

    def predict_x0(self, x_t: torch.Tensor, step: int, chunk: int, text: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x0_hat = F(x_t, h, t) for one chunk at denoising step `step`; differentiable if grad is on.

        The learner calls this for its anchors, so rollouts and updates share one definition.
        """
        t = torch.full((x_t.shape[0],), self.scheduler.timesteps[step], device=x_t.device)
        dtype = self.model_dtype
        flow = self.model(
            x_t.to(dtype), t, text.to(dtype), return_dict=False, start_frame=chunk * self.frames_per_chunk, cache=cache
        )[0]
        return self.scheduler.predict_x0(x_t, flow.float(), step)

    def predict_x0_without_cache(
        self, x_t: torch.Tensor, step: int, chunk: int, text: torch.Tensor, clean_prefix: torch.Tensor
    ) -> torch.Tensor:
        """The same prediction as `predict_x0`, recomputed from scratch: one block-causal forward
        over the clean earlier chunks and this chunk's x_t. It is the reference the cache must
        match, and the cost the cache saves (benchmarks compare the two)."""
        if self.scheduler.context_sigma > 0:
            raise ValueError("the no-cache reference is defined for context_noise = 0")
        start, batch = chunk * self.frames_per_chunk, x_t.shape[0]
        x = torch.cat([clean_prefix[:, :, :start].expand(batch, -1, -1, -1, -1), x_t], dim=2)
        t = torch.full((batch, start + self.frames_per_chunk), self.scheduler.context_timestep, device=x.device)
        t[:, start:] = self.scheduler.timesteps[step]
        window = self.new_cache()  # stays empty: it only carries the local-attention window
        flow = self.model(
            x.to(self.model_dtype),
            t,
            text.to(self.model_dtype),
            return_dict=False,
            cache=window,
            frames_per_chunk=self.frames_per_chunk,
        )[0]
        return self.scheduler.predict_x0(x_t, flow[:, :, start:].float(), step)

    def _write_context(
        self, x0: torch.Tensor, chunk: int, context_noise: torch.Tensor | None, text: torch.Tensor, cache: KVCache
    ) -> None:
        x = x0
        if self.scheduler.context_sigma > 0:
            x = self.scheduler.add_noise(x0, context_noise, self.scheduler.context_sigma)
        t = torch.full((x.shape[0],), self.scheduler.context_timestep, device=x.device)
        self.model(
            x.to(self.model_dtype),
            t,
            text,
            return_dict=False,
            start_frame=chunk * self.frames_per_chunk,
            cache=cache,
            write_cache=True,
        )

    # -- the loop -------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(
        self,
        text: torch.Tensor,
        noise: NoiseSource,
        *,
        cache: KVCache | None = None,
        start_chunk: int = 0,
        end_chunk: int | None = None,
        record: tuple[int, ...] = (),
        use_cache: bool = True,
    ) -> Iterator[ChunkOutput]:
        """Generate chunks [start_chunk, end_chunk) and yield each as it finishes.

        text: prompt embeddings [1 or B, tokens, text_dim]. `cache` must hold chunks before
        `start_chunk` (a fresh one is made when starting at 0) and is extended in place.
        `use_cache=False` recomputes the whole context at every step instead (a reference/baseline).
        """
        end_chunk = self.num_chunks if end_chunk is None else end_chunk
        if not 0 <= start_chunk <= end_chunk <= self.num_chunks:
            raise ValueError(f"chunk range [{start_chunk}, {end_chunk}) outside 0..{self.num_chunks}")
        if cache is None:
            if start_chunk != 0:
                raise ValueError("starting after chunk 0 needs the cache of the earlier chunks")
            cache = self.new_cache()
        device = self.device
        text = text.to(device=device, dtype=self.model_dtype)
        batch = noise.batch_size
        steps = self.scheduler.num_steps

        if not use_cache and start_chunk != 0:
            raise ValueError("use_cache=False generates from chunk 0")
        finished: list[torch.Tensor] = []  # clean chunks, kept only for use_cache=False

        chunks = range(start_chunk, end_chunk)
        for chunk in tqdm(chunks, desc="chunks", disable=not self.progress, leave=False):
            # The last chunk's context pass would feed no one: skip it (same video, one pass less).
            write_context = use_cache and chunk + 1 < self.num_chunks
            # All of this chunk's noise, drawn on the host and moved in one copy (common/model/noise.py).
            drawn = draw_chunk(noise, chunk, steps, write_context and self.scheduler.context_sigma > 0, device)
            x = drawn.initial.expand(batch, *self.chunk_shape)
            inputs, predictions = [], []
            for step in range(steps):
                if use_cache:
                    x0 = self.predict_x0(x, step, chunk, text, cache)
                else:
                    prefix = torch.cat(finished, dim=2) if finished else x[:, :, :0]
                    x0 = self.predict_x0_without_cache(x, step, chunk, text, prefix)
                if chunk in record:
                    inputs.append(x)
                    predictions.append(x0)
                if step + 1 < steps:
                    x = self.scheduler.renoise(x0, drawn.solver[step], step + 1)
            if write_context:
                self._write_context(x0, chunk, drawn.context, text, cache)
            if not use_cache:
                finished.append(x0)
            yield ChunkOutput(
                chunk,
                x0,
                torch.stack(inputs, 1) if inputs else None,
                torch.stack(predictions, 1) if predictions else None,
            )

    def generate(self, text: torch.Tensor, noise: NoiseSource, use_cache: bool = True) -> torch.Tensor:
        """Whole latent videos [B, C, F, H, W]."""
        return torch.cat([out.latents for out in self.stream(text, noise, use_cache=use_cache)], dim=2)

    # -- forking --------------------------------------------------------------------------------

    @torch.no_grad()
    def fork(
        self,
        text: torch.Tensor,
        plan: NoisePlan,
        *,
        pivot: int,
        group_size: int,
        sigma: float,
        fork_seed: int,
    ) -> ForkedGroup:
        """Run chunks before `pivot` once, then G branches from that state (in sub-batches).

        Branch i starts chunk `pivot` from e_i = sqrt(1 - sigma^2) e* + sigma d_i; every other
        noise (pivot solver noise, completion chunks' initial and solver noise) is shared.
        """
        if not 0 <= pivot < self.num_chunks:
            raise ValueError(f"pivot {pivot} outside 0..{self.num_chunks - 1}")
        if text.shape[0] != 1:
            raise ValueError("a fork continues one prompt: text must have batch 1")
        # The prefix cache holds the chunks before the pivot only; each sub-batch's branches copy
        # them into their own buffers (of the whole video, at their batch) at their first forward.
        cache = self.new_cache(capacity_frames=pivot * self.frames_per_chunk)
        prefix = [out.latents for out in self.stream(text, plan, cache=cache, end_chunk=pivot)]
        prefix_latents = (
            torch.cat(prefix, dim=2)
            if prefix
            else torch.zeros((1, self.chunk_shape[0], 0, self.latent_height, self.latent_width), device=self.device)
        )

        branch_capacity = self.new_cache().capacity_frames  # the whole video (None: concatenating)
        branch_chunks, inputs, predictions, branch_noise = [], [], [], []
        for first in range(0, group_size, self.fork_batch_size):
            ids = tuple(range(first, min(first + self.fork_batch_size, group_size)))
            noise = BranchNoise(plan, pivot, sigma, fork_seed, ids)
            branches = cache.fork(capacity_frames=branch_capacity)
            outs = list(self.stream(text, noise, cache=branches, start_chunk=pivot, record=(pivot,)))
            branch_chunks.append(torch.cat([o.latents for o in outs], dim=2))
            inputs.append(outs[0].inputs)
            predictions.append(outs[0].predictions)
            branch_noise.append(noise.initial(pivot, self.device))

        suffix = torch.cat(branch_chunks, dim=0)
        videos = torch.cat([prefix_latents.expand(group_size, *prefix_latents.shape[1:]), suffix], dim=2)
        return ForkedGroup(
            pivot=pivot,
            sigma=sigma,
            plan_seed=plan.seeds[0],
            fork_seed=fork_seed,
            prefix_latents=prefix_latents,
            videos=videos,
            pivot_inputs=torch.cat(inputs, dim=0),
            pivot_predictions=torch.cat(predictions, dim=0),
            base_noise=plan.initial(pivot, self.device),
            branch_noise=torch.cat(branch_noise, dim=0),
        )

    # -- the learner's rebuild ------------------------------------------------------------------

    @torch.no_grad()
    def rebuild_cache(
        self, text: torch.Tensor, prefix_latents: torch.Tensor, noise: NoiseSource | None = None
    ) -> KVCache:
        """h_{p-1} from the prefix's clean latents [B, C, p*f, H, W]: the rollout's context passes
        replayed chunk by chunk.

        Chunk by chunk is exactly what the rollout computed, and it never builds a dense [N, N]
        block-causal mask (at 18 frames of 480x832 that mask is 0.7 GiB and its additive bias
        1.5 GiB per layer call). It matches the one-pass full-sequence rebuild (the model's
        `frames_per_chunk` mode) to float tolerance. `noise` is needed only when context_noise > 0,
        to re-noise the prefix the way the rollout did.
        """
        cache = self.new_cache()
        num_frames = prefix_latents.shape[2]
        if num_frames % self.frames_per_chunk:
            raise ValueError(f"prefix of {num_frames} frames is not whole chunks of {self.frames_per_chunk}")
        if self.scheduler.context_sigma > 0 and num_frames and noise is None:
            raise ValueError("context_noise > 0: pass the rollout's noise to rebuild its cache")
        device = self.device
        text = text.to(device=device, dtype=self.model_dtype)
        f = self.frames_per_chunk
        for chunk in range(num_frames // f):
            x0 = prefix_latents[:, :, chunk * f : (chunk + 1) * f].to(device=device, dtype=torch.float32)
            context = to_device([noise.context(chunk)], device)[0] if self.scheduler.context_sigma > 0 else None
            self._write_context(x0, chunk, context, text, cache)
        return cache
