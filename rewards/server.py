"""The reward server: a Ray actor that owns reward models and batches requests across groups.

Rollout workers call `score(videos, prompts)` concurrently (the actor is async); the server gathers
requests for up to `rewards.batch_timeout_s` or `rewards.max_batch_videos` videos, runs each model
once on the concatenation, and answers every caller with its own slice. A model that raises, or
returns a score that is not finite, fails only the requests in that batch, with a RewardError that
names the component and the video; failures are counted, never averaged in.

Videos arrive as uint8 frames [B, F, H, W, 3] (what a decoder or an mp4 gives) plus prompts.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import torch

from common.errors import RewardError
from rewards.base import RewardModel
from rewards.registry import ToyReward, build_models

if TYPE_CHECKING:
    from common.config import Config


class ToyRewardModel(ToyReward):
    """The toy world's VQ/MQ/TA stand-ins and its held-out OOD score (rewards/toy.py), behind the
    one reward-model interface (rewards/base.py)."""


def build_reward_models(config: Config) -> list:
    """The models of `rewards.models` (their specs: common/config.py); none configured (a toy-world
    config only): the toy rewards of the configured terms plus the out-of-domain score (never trained
    on)."""
    return build_models(config)


def server_options(config: Config) -> dict:
    """Extra Ray actor options of a reward server, beyond num_cpus/num_gpus/placement: the server's
    `rewards.runtime_env` and custom `rewards.resources`. The driver adds them with
    `server_cls.options(..., **server_options(config))`."""
    w = config.rewards
    options: dict = {}
    if w.runtime_env:
        options["runtime_env"] = dict(w.runtime_env)
    if w.resources:
        options["resources"] = dict(w.resources)
    return options


def check_videos(frames, prompts) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise RewardError(
            f"videos must be uint8 [B, F, H, W, 3], got "
            f"{getattr(frames, 'dtype', type(frames).__name__)} {tuple(getattr(frames, 'shape', ()))}"
        )
    if frames.shape[0] == 0 or frames.shape[1] == 0:
        raise RewardError(f"empty video batch {tuple(frames.shape)}")
    if len(prompts) != frames.shape[0]:
        raise RewardError(f"{frames.shape[0]} videos but {len(prompts)} prompts")


def score_batch(
    models, frames: torch.Tensor, prompts: list[str], fps: float | None = None, latency: dict | None = None
) -> dict[str, torch.Tensor]:
    """Every model on one batch; each component checked for shape and finiteness. With `latency`,
    each model's calls, videos and seconds are added under its name."""
    out: dict[str, torch.Tensor] = {}
    for model in models:
        start = time.perf_counter()
        try:
            if fps is not None and isinstance(model, RewardModel):
                scores = model(frames, prompts, fps=fps)
            else:
                scores = model(frames, prompts)
        finally:
            if latency is not None:
                name = getattr(model, "name", type(model).__name__)
                entry = latency.setdefault(name, {"calls": 0, "videos": 0, "seconds": 0.0})
                entry["calls"] += 1
                entry["videos"] += int(frames.shape[0])
                entry["seconds"] += time.perf_counter() - start
        for name, value in scores.items():
            value = torch.as_tensor(value).detach().float().cpu().reshape(-1)
            if value.shape[0] != frames.shape[0]:
                raise RewardError(f"reward {name!r} returned {value.shape[0]} scores for {frames.shape[0]} videos")
            bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
            if bad:
                raise RewardError(f"reward {name!r} is not finite for video(s) {bad}")
            out[name] = value
    return out


class RewardServer:
    """Ray actor body (wrapped with ray.remote by the driver, so this module imports without Ray)."""

    def __init__(self, config_dict: dict, index: int = 0):
        from common.config import Config

        config = Config.model_validate(config_dict)
        torch.set_num_threads(max(1, int(config.rewards.num_cpus_per_server)))
        self.index = index
        self.models = build_reward_models(config)
        self.max_batch = config.rewards.max_batch_videos
        self.timeout = config.rewards.batch_timeout_s
        self.fps = config.rewards.video_fps
        self.latency: dict[str, dict] = {}
        self.queue: asyncio.Queue | None = None
        self.stats = {
            "requests": 0,
            "videos": 0,
            "batches": 0,
            "failures": 0,
            "busy_seconds": 0.0,
            "started": time.time(),
        }

    async def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        check_videos(frames, prompts)
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batcher())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((frames, list(prompts), future))
        return await future

    async def _batcher(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.timeout
            size = batch[0][0].shape[0]
            while size < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
                batch.append(item)
                size += item[0].shape[0]
            self._run(batch)

    def _run(self, batch) -> None:
        start = time.perf_counter()
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        try:
            same_size = len({tuple(f.shape[1:]) for f, _, _ in batch}) == 1
            if not same_size:
                raise RewardError("batched videos differ in shape")  # handled below, one by one
            frames = torch.cat([f for f, _, _ in batch])
            prompts = [p for _, ps, _ in batch for p in ps]
            scores = score_batch(self.models, frames, prompts, self.fps, self.latency)
            at = 0
            for f, _, future in batch:
                n = f.shape[0]
                future.set_result({k: v[at : at + n].clone() for k, v in scores.items()})
                at += n
            self.stats["videos"] += frames.shape[0]
        except Exception:
            # Score the requests one by one, so a bad one fails alone and good ones still answer.
            for f, ps, future in batch:
                if future.done():
                    continue
                try:
                    future.set_result(score_batch(self.models, f, ps, self.fps, self.latency))
                    self.stats["videos"] += f.shape[0]
                except Exception as exc:
                    self.stats["failures"] += 1
                    future.set_exception(
                        exc if isinstance(exc, RewardError) else RewardError(f"reward model failed: {exc}")
                    )
        self.stats["busy_seconds"] += time.perf_counter() - start

    def get_stats(self) -> dict:
        """Counters, plus per model: calls, videos, seconds, ms_per_video, ms_per_call."""
        models = {
            name: dict(
                e,
                ms_per_video=1000 * e["seconds"] / max(e["videos"], 1),
                ms_per_call=1000 * e["seconds"] / max(e["calls"], 1),
            )
            for name, e in self.latency.items()
        }
        from common.metrics import peak_rss_bytes

        return dict(
            self.stats,
            index=self.index,
            components=[c for m in self.models for c in m.components],
            models=models,
            peak_rss_bytes=peak_rss_bytes(),
        )
