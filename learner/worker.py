"""A learner: one rank of the learner group that trains the LoRA adapters with data parallelism.

K learners form one torch.distributed group (gloo on CPU, NCCL on GPUs). Each takes its shard of
the global batch (group i goes to rank i mod K), computes the AR-CoPO loss on the pivot chunk after
rebuilding h_{p-1} from the prefix latents (learner/update.py), and the gradients are summed across
ranks before clipping, so K learners make the same update as one learner given the same global
batch. Rank 0 publishes weights and writes checkpoints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from common.dataflow.records import RolloutGroup
from common.dataflow.weights import CollectiveGroup, ObjectStoreTransport, WeightGroupError, pack
from common.model import adapters
from common.net import free_port
from common.seeds import derive_seed
from learner.update import UpdateSettings, arcopo_update


def anchor_generator(seed: int, iteration: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(f"{seed}/{iteration}/{index}"))


class Learner:
    """Ray actor body; the driver names it `learner-<rank>`."""

    def __init__(
        self, config_dict: dict, rank: int, world_size: int, replay: dict | None = None, record_key: bytes | None = None
    ):
        from common.config import Config
        from common.model.policy import Policy

        self.config = Config.model_validate(config_dict)
        torch.set_num_threads(max(1, int(self.config.learner.num_cpus_per_worker)))
        self.rank, self.world_size = rank, world_size
        # Prompt embeddings from the job's file only, and no decoder: a learner never loads the text
        # encoder nor the VAE.
        self.policy = Policy.from_config(self.config, role="learner")
        if self.config.learner.gradient_checkpointing:
            # Only the update's forward runs with grad; rollouts and the cache rebuild are no-grad.
            self.policy.model.enable_gradient_checkpointing()
        self.fingerprint = self.policy.base_fingerprint()
        self.record_key = record_key
        self.settings = UpdateSettings.from_config(self.config)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.params: dict[str, list[torch.nn.Parameter]] = {}
        self.version = 0
        self.replay = None
        if replay is not None:
            from common.dataflow.replay import ReplayBuffer

            self.replay = ReplayBuffer.from_config(self.config.replay, replay["url"], replay["name"], key=record_key)
        self.busy_seconds = 0.0
        self.started = time.time()

    # -- the process group ---------------------------------------------------------------------

    def address(self) -> tuple[str, int]:
        import ray

        host = ray.util.get_node_ip_address()
        return host, free_port(host if host != "127.0.0.1" else "127.0.0.1")

    def join(self, host: str, port: int) -> bool:
        if self.world_size > 1:
            import torch.distributed as dist

            # One group carries both kinds of tensor: gradients on the GPU go over NCCL, and the
            # replay sample ids that rank 0 broadcasts are a CPU tensor, which NCCL refuses.
            backend = "cpu:gloo,cuda:nccl" if self._backend() == "nccl" else "gloo"
            dist.init_process_group(
                backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world_size
            )
        return True

    def _reduce(self, params: list[torch.nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        at = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[at : at + n].view_as(p).clone()
            at += n

    # -- training --------------------------------------------------------------------------------

    def _optimizer(self, adapter: str) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
        params = adapters.train_adapter(self.policy.model, adapter)
        if adapter not in self.optimizers:
            lr = self.config.learner
            self.optimizers[adapter] = torch.optim.AdamW(params, lr=lr.lr, weight_decay=lr.weight_decay)
        return params, self.optimizers[adapter]

    def _train(
        self,
        adapter: str,
        iteration: int,
        indexed: list[tuple[int, RolloutGroup]],
        total: int,
        clip_eps: float | None,
        reward_of,
    ) -> dict:
        start = time.perf_counter()
        params, optimizer = self._optimizer(adapter)
        settings = UpdateSettings(**vars(self.settings))
        if clip_eps is not None:
            settings.clip_eps = clip_eps
        groups = [g for _, g in indexed]
        stats = arcopo_update(
            self.policy.sampler,
            groups,
            [reward_of(g) for g in groups],
            [self.policy.text([g.prompt]) for g in groups],
            params,
            optimizer,
            settings,
            anchor_generators=[anchor_generator(self.config.run.seed, iteration, i) for i, _ in indexed],
            total_groups=total,
            reduce_grads=self._reduce,
        )
        self.policy.model.requires_grad_(False)
        self.version += 1
        seconds = time.perf_counter() - start
        self.busy_seconds += seconds
        return dict(vars(stats), version=self.version, seconds=seconds, groups=len(groups), rank=self.rank)

    def train_groups(self, iteration: int, adapter: str, indices: list[int], total: int, *records: bytes) -> dict:
        """One update on this rank's shard of fresh groups (the records arrive as resolved ObjectRefs)."""
        groups = [RolloutGroup.from_bytes(r, key=self.record_key) for r in records]
        pairs = list(zip(indices, groups, strict=True))
        return self._train(adapter, iteration, pairs, total, None, lambda g: g.rewards)

    def train_from_replay(self, iteration: int, adapter: str, batch_size: int, seed: int, clip: bool = True) -> dict:
        """One update of `adapter` on a batch drawn from the replay buffer with pi_old = pi_ref.

        Rank 0 draws the ids (so each draw is counted once); every rank reads its own shard's items.
        """
        if self.replay is None:
            raise RuntimeError("learner has no replay buffer")
        ids = torch.zeros(batch_size, dtype=torch.int64)
        if self.rank == 0:
            ids = torch.tensor(self.replay.sample_ids(batch_size, seed), dtype=torch.int64)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.broadcast(ids, 0)
        mine = [(i, int(ids[i])) for i in range(batch_size) if i % self.world_size == self.rank]
        indexed = [(i, self.replay.get(item)) for i, item in mine]
        semi_reward = self.config.replay.semi_reward
        reward_of = (lambda g: g.rewards) if semi_reward == "joint" else (lambda g: g.reward_components["ta"])
        no_clip = 1e9  # the paper's "off-policy" ablation: a ratio clip so wide it never binds
        return self._train(adapter, iteration, indexed, batch_size, None if clip else no_clip, reward_of)

    # -- publishing and checkpoints ---------------------------------------------------------------

    def publish(self) -> list:
        """Rank 0: pack the synced tensors into buckets and put them in the object store once.
        Returned inside a list so the caller receives the ObjectRef, not the bytes."""
        handle, ref = ObjectStoreTransport().publish(self._pack())
        return [handle, ref]

    def _pack(self):
        """The current weights as one packet (both transports ship the same thing)."""
        c = self.config.cluster
        return pack(
            self.policy.synced_tensors(c.weight_sync),
            self.version,
            c.weight_sync,
            c.bucket_mb << 20,
            self.fingerprint if c.weight_sync == "adapters" else "",
        )

    def base_fingerprint(self) -> str:
        return self.fingerprint

    # -- the collective transport (cluster.weight_transport=collective) ---------------------------

    def weights_store(self) -> tuple[str, int]:
        """Rank 0 hosts the rendezvous store of the weight-broadcast groups, once per run."""
        import ray

        if getattr(self, "_store", None) is None:
            host = ray.util.get_node_ip_address()
            port = free_port(host)
            self._store_address = (host, port)
            self._store = CollectiveGroup.host_store(host, port)
        return self._store_address

    def form_weights_group(self, generation: int, world_size: int) -> int:
        """Rank 0 of the broadcast group of `generation` (its rendezvous with every rollout worker);
        WeightGroupError when the driver aborts it (a worker died) or it fails."""
        host, port = self.weights_store()
        self._weights_group = None  # a failed rendezvous leaves no group of an older generation behind
        self._weights_group = CollectiveGroup(
            host, port, 0, world_size, generation, self._backend(), timeout_s=self.config.cluster.call_timeout_s
        )
        return generation

    def pack_weights(self):
        self._packet = self._pack()
        return self._packet.handle()

    def broadcast_weights(self, generation: int | None = None) -> int:
        """Send the packed weights over the group of `generation` (WeightGroupError when that is not
        the group formed last, or when the broadcast fails or is aborted: the driver forms another)."""
        group = getattr(self, "_weights_group", None)
        if group is None or (generation is not None and group.generation != generation):
            raise WeightGroupError(f"learner: no weight group of generation {generation}")
        group.send(self._packet)
        return self._packet.version

    def _backend(self) -> str:
        return "nccl" if torch.cuda.is_available() and self.config.model.device.startswith("cuda") else "gloo"

    def adapter_checksum(self, adapter: str) -> float:
        return float(
            sum(v.double().abs().sum() for v in adapters.adapter_state_dict(self.policy.model, adapter).values())
        )

    def adapter_tensors(self, adapter: str) -> dict[str, torch.Tensor]:
        return adapters.adapter_state_dict(self.policy.model, adapter)

    def save(self, directory: str) -> list[str]:
        """Rank 0: each adapter as a diffusers Wan LoRA file under directory/<adapter>/."""
        if self.rank != 0:
            return []
        out = []
        for name in adapters.ADAPTERS:
            out.append(str(adapters.save_adapter(self.policy.model, name, Path(directory) / name)))
        return out

    def save_state(self, path: str) -> str:
        """Rank 0: adapters, optimiser states and the weight version, for resuming (atomic)."""
        from common.durable import torch_save_atomic

        state = {
            "version": self.version,
            "adapters": {n: adapters.adapter_state_dict(self.policy.model, n) for n in adapters.ADAPTERS},
            "optimizers": {a: opt.state_dict() for a, opt in self.optimizers.items()},
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch_save_atomic(state, path)
        return str(path)

    def load_state(self, path: str) -> int:
        """Every rank: the state `save_state` wrote. weights_only: nothing but tensors and plain data
        is unpickled, so a tampered checkpoint cannot run code."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, tensors in state["adapters"].items():
            adapters.load_adapter_state_dict(self.policy.model, name, tensors)
        for adapter, opt_state in state["optimizers"].items():
            self._optimizer(adapter)[1].load_state_dict(opt_state)
        self.policy.model.requires_grad_(False)
        self.version = int(state["version"])
        return self.version

    def stats(self) -> dict:
        from common.metrics import peak_rss_bytes

        return {
            "rank": self.rank,
            "version": self.version,
            "busy_seconds": self.busy_seconds,
            "uptime": time.time() - self.started,
            "pid": os.getpid(),
            "peak_rss_bytes": peak_rss_bytes(),
        }
