"""The rollout worker: a Ray actor that holds the policy, forks groups, and ships them onward.

For each `GroupJob` it forks one rollout into G neighbours (actors/rollout.py), decodes the videos,
asks a reward server for scores (actor to actor), and then either inserts the record into the Redis
replay buffer (reference groups) or returns it as an ObjectRef that the driver forwards to the
learner without ever fetching it. The driver gets only a `GroupSummary`.

Weights arrive through `sync_weights` (common/dataflow/weights.py) and every group records the
version it was made with, so the learner can enforce `learner.max_staleness`.
"""

from __future__ import annotations

import os
import time

import torch

from actors.rollout import collect_group
from common.dataflow.jobs import GroupJob, GroupSummary
from common.evaluation import score_policy


class RolloutWorker:
    """Ray actor body; the driver wraps it with ray.remote and names it `rollout-<i>`."""

    def __init__(self, config_dict: dict, name: str, replay: dict | None = None, record_key: bytes | None = None):
        from common.config import Config
        from common.model.policy import Policy

        self.config = Config.model_validate(config_dict)
        torch.set_num_threads(max(1, int(self.config.rollout.num_cpus_per_worker)))
        self.name = name
        # Prompt embeddings from the job's file; the text encoder is built only for a prompt it lacks.
        self.policy = Policy.from_config(self.config, role="rollout")
        self.fingerprint = self.policy.base_fingerprint()
        self.version = -1  # no weights received yet; the driver syncs before the first job
        self.record_key = record_key
        self.replay = None
        if replay is not None:
            from common.dataflow.replay import ReplayBuffer

            self.replay = ReplayBuffer.from_config(self.config.replay, replay["url"], replay["name"], key=record_key)
        self.weights = {t.name: t.weight for t in self.config.rewards.terms}
        self.busy_seconds = 0.0
        self.started = time.time()
        self.groups = 0

    # -- weights -----------------------------------------------------------------------------

    def sync_weights(self, handle, payload) -> int:
        """The object-store transport: `payload` is the bucket list (Ray resolved the ObjectRef)."""
        self._check_base(handle)
        from common.dataflow.weights import ObjectStoreTransport

        tensors = ObjectStoreTransport().receive(handle, payload)
        self.policy.load_synced_tensors(tensors, handle.what)
        self.version = handle.version
        return self.version

    def join_weights_group(self, host: str, port: int, generation: int, rank: int, world_size: int) -> int:
        """Join the broadcast group of `generation` (WeightGroupError when the driver aborts it)."""
        from common.dataflow.weights import CollectiveGroup

        backend = "nccl" if self.config.model.device.startswith("cuda") else "gloo"
        self._weights_group = None  # a failed rendezvous leaves no group of an older generation behind
        self._weights_group = CollectiveGroup(
            host, port, rank, world_size, generation, backend, timeout_s=self.config.cluster.call_timeout_s
        )
        return generation

    def receive_weights(self, handle, generation: int | None = None) -> int:
        """The collective transport: the buckets come by broadcast from learner rank 0, over the group
        of `generation` (WeightGroupError when that is not the one joined last, or it fails)."""
        from common.dataflow.weights import WeightGroupError

        self._check_base(handle)
        group = getattr(self, "_weights_group", None)
        if group is None or (generation is not None and group.generation != generation):
            raise WeightGroupError(f"{self.name}: no weight group of generation {generation}")
        tensors = group.receive(handle)
        self.policy.load_synced_tensors(tensors, handle.what)
        self.version = handle.version
        return self.version

    def _check_base(self, handle) -> None:
        if handle.base_fingerprint and handle.base_fingerprint != self.fingerprint:
            raise RuntimeError(
                f"{self.name}: base weights {self.fingerprint} differ from the learner's "
                f"{handle.base_fingerprint}; was the checkpoint replaced while the job started?"
            )

    def weight_version(self) -> int:
        return self.version

    def ping(self) -> dict:
        from common.metrics import peak_rss_bytes

        return {
            "name": self.name,
            "pid": os.getpid(),
            "version": self.version,
            "groups": self.groups,
            "busy_seconds": self.busy_seconds,
            "uptime": time.time() - self.started,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    # -- work --------------------------------------------------------------------------------

    def _scores(self, reward_server, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`frames`: uint8 [B, F, H, W, 3] on the CPU, as the policy's decoder gives them."""
        import ray

        ref = reward_server.score.remote(frames, prompts)
        return ray.get(ref, timeout=self.config.cluster.call_timeout_s)

    def collect(self, job: GroupJob, reward_server):
        """Returns (GroupSummary, record bytes); the bytes are empty when the group went to Redis."""
        if self.version < 0:
            raise RuntimeError(f"{self.name}: no weights yet; sync_weights must come before the first job")
        start = time.perf_counter()
        a = self.config.algorithm
        self.policy.set_mode(job.mode)
        reward_seconds = 0.0

        def reward_fn(videos, prompts):
            nonlocal reward_seconds
            t0 = time.perf_counter()
            out = self._scores(reward_server, videos, prompts)
            reward_seconds += time.perf_counter() - t0
            return out

        group = collect_group(
            self.policy.sampler,
            self.policy.text([job.prompt]),
            job.prompt,
            pivot=job.pivot,
            group_size=a.group_size,
            sigma=a.fork_sigma,
            plan_seed=job.plan_seed,
            fork_seed=job.fork_seed,
            decode=self.policy.decode,
            reward_fn=reward_fn,
            weights=self.weights,
            policy_version=self.version,
            adapter=job.mode,
        )
        group.extra.update(job_id=job.job_id, phase=job.phase, worker=self.name)
        seconds = time.perf_counter() - start
        summary = GroupSummary(
            job_id=job.job_id,
            phase=job.phase,
            group_id=group.group_id,
            policy_version=self.version,
            worker=self.name,
            reward_mean=group.rewards.mean().item(),
            reward_std=group.rewards.std().item(),
            components={k: v.mean().item() for k, v in group.reward_components.items()},
            rollout_seconds=seconds - reward_seconds,
            reward_seconds=reward_seconds,
        )
        data = b""
        if job.phase == "reference":
            if self.replay is None:
                raise RuntimeError(f"{self.name}: a reference job needs the replay buffer")
            summary.replay_id = self.replay.insert(group)
            summary.record_bytes = self.replay.last_insert_bytes
        else:
            data = group.to_bytes(key=self.record_key)
            summary.record_bytes = len(data)
        self.groups += 1
        self.busy_seconds += time.perf_counter() - start
        return summary, data

    @torch.no_grad()
    def evaluate(
        self, prompts: list[str], seeds: list[int], mode: str, merge_scale: float, reward_server
    ) -> dict[str, list[float]]:
        """Per-video scores of every reward component for fixed prompts and noise seeds
        (common/evaluation.py: the one evaluation loop)."""
        start = time.perf_counter()
        self.policy.set_mode(mode, merge_scale)
        out = score_policy(
            self.policy,
            prompts,
            seeds,
            lambda frames, p: self._scores(reward_server, frames, p),
            self.config.run.eval_batch_size,
        )
        self.busy_seconds += time.perf_counter() - start
        return out

    @torch.no_grad()
    def sample_videos(
        self, prompts: list[str], seeds: list[int], mode: str, merge_scale: float = 1.0, fps: float = 8.0
    ) -> list[bytes]:
        """mp4 bytes of each prompt's video (small: what a person watches, not training data)."""
        from common.video import encode_mp4

        self.policy.set_mode(mode, merge_scale)
        videos = []
        for _, frames in self.policy.videos(prompts, seeds, self.config.run.eval_batch_size):
            upscale = max(1, 128 // frames.shape[2])
            videos += [encode_mp4(f, fps=fps, upscale=upscale) for f in frames]
        return videos
