"""Placing the roles on the cluster: learner group, reward servers and rollout workers, each with
the resources its config section asks for, independently of the others.

The learner group is gang-scheduled in one placement group (its ranks must all start, or none);
reward servers share another; rollout workers are single actors so they can come and go while the
job runs. Every actor is named (`learner-<rank>`, `reward-<i>`, `rollout-<i>`, `controller`) in
`cluster.namespace`, so `ray list actors` and `cluster.scale` find them.

`RunRoles` holds them all and is what the driver (cluster/driver.py) talks to: it says what to do
(publish and sync weights, train on groups, roll out jobs, evaluate, checkpoint) and never handles
the actors itself.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.checkpoints import write_checkpoint
from cluster.controller import Controller, Counters
from cluster.pool import RolloutPool

if TYPE_CHECKING:
    from common.config import Config

log = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """The cluster cannot hold what the config asks for; says which role and resource."""


def check_resources(config: Config, available: dict) -> None:
    """Refuse, before any actor starts, a config that asks for more than the cluster has."""
    r, w, lrn = config.rollout, config.rewards, config.learner
    need = {
        "CPU": r.num_workers * r.num_cpus_per_worker
        + w.num_servers * w.num_cpus_per_server
        + lrn.num_workers * lrn.num_cpus_per_worker,
        "GPU": r.num_workers * r.num_gpus_per_worker
        + w.num_servers * w.num_gpus_per_server
        + lrn.num_workers * lrn.num_gpus_per_worker,
    }
    for _role, count, extra in (
        ("rollout", r.num_workers, r.resources),
        ("rewards", w.num_servers, w.resources),
        ("learner", lrn.num_workers, lrn.resources),
    ):
        for resource, amount in extra.items():
            need[resource] = need.get(resource, 0.0) + count * amount
    for resource, amount in need.items():
        have = available.get(resource, 0.0)
        if amount > have + 1e-9:
            if resource not in ("CPU", "GPU"):
                raise PlacementError(
                    f"the roles need {amount:g} of the custom resource {resource!r} "
                    f"(rollout/rewards/learner .resources) but the cluster has {have:g}"
                )
            raise PlacementError(
                f"the roles need {amount:g} {resource} (rollout {r.num_workers} x "
                f"{getattr(r, f'num_{resource.lower()}s_per_worker'):g}, rewards {w.num_servers} x "
                f"{getattr(w, f'num_{resource.lower()}s_per_server'):g}, learner {lrn.num_workers} x "
                f"{getattr(lrn, f'num_{resource.lower()}s_per_worker'):g}) but the cluster has {have:g}; "
                f"lower rollout/rewards/learner counts or set cluster.num_cpus for a local run"
            )


def encode_prompts(config: Config, prompts: list[str]) -> dict:
    """Make `model.prompt_cache` hold every prompt of `prompts`, once, before any role starts.

    A Ray task on the rollout role's resources (where a text encoder would otherwise live in every
    worker) encodes what the file lacks and writes it; max_calls=1 ends its process afterwards, so the
    encoder's GPU memory goes back before the rollout workers take that GPU. The driver never loads
    the encoder nor holds the embeddings: it gets a few counts back (common/prompt_cache.build).

    The toy world's encoder is a table of word vectors (kilobytes, microseconds): the driver writes
    its file itself, since a task would add seconds to every toy job's start. The roles read the
    file exactly as they read a real encoder's.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayTaskError

    from common.model.prompt_cache import PromptCacheError, build, build_in_task

    if config.model.text_encoder_kind == "toy":
        return build(config, prompts, config.model.prompt_cache)
    check_resources(config, ray.cluster_resources())
    r = config.rollout
    task = ray.remote(max_calls=1, max_retries=0)(build_in_task).options(
        name="encode-prompts",
        num_cpus=r.num_cpus_per_worker,
        num_gpus=r.num_gpus_per_worker,
        resources=dict(r.resources) or None,
    )
    ref = task.remote(config.model_dump(mode="json"), list(prompts))
    try:
        return ray.get(ref, timeout=config.cluster.call_timeout_s)
    except RayTaskError as exc:
        if isinstance(exc.cause, PromptCacheError):  # a file of another encoder: its own message, no traceback
            raise exc.cause from None
        raise
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        raise PlacementError(
            f"encoding {len(prompts)} prompts into {config.model.prompt_cache} (model.prompt_cache) "
            f"took longer than cluster.call_timeout_s ({config.cluster.call_timeout_s:g} s) on the "
            "rollout role's resources"
        ) from None


class RunRoles:
    """The roles of a run (learner group, reward servers, the rollout pool and its controller), plus
    the weight broadcast and the sharding of learner batches. `counters` are the run's tallies
    (the pool and the weight broadcast add to them); `metrics` (common.metrics.RunMetrics or None)
    is what the pool exports to."""

    def __init__(self, config: Config, replay: dict | None, record_key: bytes, counters: Counters, metrics=None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.worker import RolloutWorker
        from learner.worker import Learner
        from rewards.server import RewardServer, server_options

        self.config = config
        check_resources(config, ray.cluster_resources())
        cfg = config.model_dump(mode="json")
        ns = config.cluster.namespace
        self.counters = counters
        self.placement_groups = []

        lrn = config.learner
        learner_pg = placement_group(
            [{"CPU": lrn.num_cpus_per_worker, "GPU": lrn.num_gpus_per_worker, **lrn.resources}] * lrn.num_workers,
            strategy="PACK",
            name=f"{ns}-learners",
        )
        self.placement_groups.append(learner_pg)
        w = config.rewards
        reward_pg = placement_group(
            [{"CPU": w.num_cpus_per_server, "GPU": w.num_gpus_per_server, **w.resources}] * w.num_servers,
            strategy="SPREAD",
            name=f"{ns}-rewards",
        )
        self.placement_groups.append(reward_pg)
        ray.get([learner_pg.ready(), reward_pg.ready()], timeout=config.cluster.call_timeout_s)

        learner_cls = ray.remote(Learner)
        self.replay = replay

        def make_learner(rank: int):
            return learner_cls.options(
                name=f"learner-{rank}",
                namespace=ns,
                num_cpus=lrn.num_cpus_per_worker,
                num_gpus=lrn.num_gpus_per_worker,
                max_restarts=0,
                resources=dict(lrn.resources) or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(learner_pg, rank),
            ).remote(cfg, rank, lrn.num_workers, replay, record_key)

        self._make_learner = make_learner
        self.learners = self._start_learners()

        server_cls = ray.remote(RewardServer)
        self.reward_servers = [
            # A reward server that dies is restarted by Ray and the calls it held are retried on it:
            # scoring is a pure function of the videos, so a retry cannot put a group in twice.
            server_cls.options(
                name=f"reward-{i}",
                namespace=ns,
                num_cpus=w.num_cpus_per_server,
                num_gpus=w.num_gpus_per_server,
                max_concurrency=256,
                max_restarts=-1,
                max_task_retries=3,
                **server_options(config),
                scheduling_strategy=PlacementGroupSchedulingStrategy(reward_pg, i),
            ).remote(cfg, i)
            for i in range(w.num_servers)
        ]

        r = config.rollout
        worker_cls = ray.remote(RolloutWorker)

        def make_worker(name: str):
            return worker_cls.options(
                name=name,
                namespace=ns,
                num_cpus=r.num_cpus_per_worker,
                num_gpus=r.num_gpus_per_worker,
                resources=dict(r.resources) or None,
                max_restarts=0,
            ).remote(cfg, name, replay, record_key)

        self.controller = (
            ray.remote(Controller).options(name="controller", namespace=ns, num_cpus=0).remote(r.num_workers)
        )
        self.last_packet = None
        c = config.cluster
        self.pool = RolloutPool(
            make_worker,
            self.sync_to,
            self.controller,
            self.reward_servers,
            self.counters,
            c.call_timeout_s,
            (c.heartbeat_s, c.heartbeat_timeout_s),
            metrics=metrics,
        )
        self.publish()
        self.pool.grow(r.num_workers)

    # -- the learner group ------------------------------------------------------------------------

    def _start_learners(self) -> list:
        """Every learner rank, in its bundle of the learner placement group, joined into one process
        group. A name still held by a rank being killed is retried until Ray has released it."""
        import ray

        learners = []
        deadline = time.monotonic() + self.config.cluster.call_timeout_s
        for rank in range(self.config.learner.num_workers):
            while True:
                try:
                    learners.append(self._make_learner(rank))
                    break
                except ValueError as exc:  # "The name learner-<rank> ... is already taken"
                    if "already taken" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        prints = ray.get([x.base_fingerprint.remote() for x in learners])
        if len(set(prints)) > 1:
            raise PlacementError(
                f"learner ranks loaded different base weights ({prints}); is the checkpoint "
                "path the same file on every node?"
            )
        host, port = ray.get(learners[0].address.remote())
        ray.get([x.join.remote(host, port) for x in learners])
        return learners

    def learners_alive(self, timeout_s: float = 30.0) -> bool:
        """Whether every learner rank answers within `timeout_s`. A rank that died, or one stuck (in a
        collective whose peer died, say), makes it False: the group as a whole is then broken."""
        import ray
        from ray.exceptions import RayError

        refs = [x.stats.remote() for x in self.learners]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            return False
        try:
            ray.get(refs)
        except RayError:
            return False
        return True

    def restart_learners(self) -> None:
        """Kill every learner rank and start the group again, in the same placement group, with fresh
        weights (the caller loads a checkpoint into them). All ranks go together: their process group
        cannot take a new member. The weight packet of the dead rank 0 is gone with it, and so is the
        rendezvous of the collective weight transport, which is formed again at the next sync."""
        import ray

        for learner in self.learners:
            try:
                ray.kill(learner, no_restart=True)
            except Exception:  # already gone
                pass
        self.last_packet = None
        self._members = None
        self.learners = self._start_learners()

    def discard_rollouts(self) -> int:
        """Give up every job out on the rollout workers (cluster/pool.py: RolloutPool.abandon_all)."""
        return self.pool.abandon_all()

    def clear_replay(self) -> int:
        """Remove every item of the run's replay buffer (a reference phase about to be collected
        again); returns how many there were."""
        if self.replay is None:
            return 0
        from common.dataflow.replay import ReplayBuffer

        buffer = ReplayBuffer(self.replay["url"], self.replay["name"])
        try:
            return buffer.clear()
        finally:
            buffer.close()

    # -- weights --------------------------------------------------------------------------------

    def publish(self):
        """Learner rank 0 packs the weights into the object store once; returns (handle, ref)."""
        import ray

        if self.config.cluster.weight_transport == "collective":
            return None  # packed and broadcast by sync_to

        handle, ref = ray.get(self.learners[0].publish.remote())
        self.last_packet = (handle, ref)
        return handle, ref

    def sync_to(self, names) -> int:
        """Deliver the last published packet: one call per worker, the same ObjectRef to all (or,
        with the collective transport, one broadcast to every live worker). A worker found dead
        is dropped from the pool (and replaced, synced, before the next job)."""
        if self.config.cluster.weight_transport == "collective":
            return self._broadcast_collective()

        handle, ref = self.last_packet
        versions = list(self.pool.call_each({n: lambda w: w.sync_weights.remote(handle, ref) for n in names}).values())
        if any(v != handle.version for v in versions):
            raise RuntimeError(f"weight sync: workers report versions {versions}, expected {handle.version}")
        return handle.nbytes

    def _broadcast_collective(self) -> int:
        """Re-form the broadcast group when the set of workers changed, then one broadcast."""
        import ray

        timeout = self.config.cluster.call_timeout_s
        workers = self.pool.workers
        members = tuple(sorted(workers))
        if members != getattr(self, "_members", None):
            self._generation = getattr(self, "_generation", -1) + 1
            host, port = ray.get(self.learners[0].weights_store.remote())
            world = len(members) + 1
            ray.get(
                [self.learners[0].form_weights_group.remote(self._generation, world)]
                + [
                    workers[n].join_weights_group.remote(host, port, self._generation, i + 1, world)
                    for i, n in enumerate(members)
                ],
                timeout=timeout,
            )
            self._members = members
        handle = ray.get(self.learners[0].pack_weights.remote())
        versions = ray.get(
            [self.learners[0].broadcast_weights.remote()]
            + [workers[n].receive_weights.remote(handle) for n in members],
            timeout=timeout,
        )
        if any(v != handle.version for v in versions):
            raise RuntimeError(f"weight broadcast: versions {versions}, expected {handle.version}")
        return handle.nbytes

    def publish_and_sync(self, names=None) -> None:
        """Publish the learner's weights once and deliver them to `names` (every rollout worker by
        default); the packet's size and the time taken go to the counters."""
        names = list(self.pool.workers) if names is None else names
        start = time.perf_counter()
        self.publish()
        self.counters.weight_sync_bytes = self.sync_to(list(names))
        self.counters.weight_sync_seconds = time.perf_counter() - start
        version = self.last_packet[0].version if self.last_packet is not None else None
        self.counters.weight_sync_log.append(
            {"version": version, "bytes": self.counters.weight_sync_bytes, "seconds": self.counters.weight_sync_seconds}
        )

    # -- rollout workers ----------------------------------------------------------------------

    def rollout_workers(self) -> list[str]:
        """Names of the rollout workers held now (retiring ones included)."""
        return list(self.pool.workers)

    def live_rollout_workers(self) -> list[str]:
        """Names of the rollout workers that take new jobs."""
        return self.pool.live()

    def scaling_events(self) -> list[str]:
        """Workers added (+name), retired (-name) or lost (lost name), in order."""
        return self.pool.events

    def collect(self, jobs, on_progress=None) -> list:
        """Roll out `jobs` (unless already out) and wait for them all: (summary, record ref) in job
        order, failed groups left out. `on_progress` is told how many have finished."""
        return self.pool.run(jobs, on_progress=on_progress)

    def prefetch(self, jobs) -> None:
        """Send out `jobs` that are not out yet, without waiting for them."""
        self.pool.submit([j for j in jobs if not self.pool.is_known(j.job_id)])

    def evaluate(self, prompts: list[str], seeds: list[int], mode: str, merge_scale: float) -> list[dict[str, float]]:
        """Every reward component of each (prompt, seed) video of a policy, shared over the live
        rollout workers; a worker that dies mid-evaluation has its share redone by the others."""
        pool, servers = self.pool, self.reward_servers
        todo = list(range(len(prompts)))
        results: dict[int, dict[str, float]] = {}
        while todo:
            pool.ensure_live()
            names = pool.live()
            shares = {n: todo[i :: len(names)] for i, n in enumerate(names) if todo[i :: len(names)]}
            calls = {}
            for k, (name, idx) in enumerate(shares.items()):
                server = servers[k % len(servers)]
                args = ([prompts[i] for i in idx], [seeds[i] for i in idx], mode, merge_scale, server)
                calls[name] = lambda w, args=args: w.evaluate.remote(*args)
            for name, out in pool.call_each(calls).items():
                for j, i in enumerate(shares[name]):
                    results[i] = {k: v[j] for k, v in out.items()}
            todo = [i for i in todo if i not in results]
        return [results[i] for i in range(len(prompts))]

    def sample_videos(self, prompts: list[str], seeds: list[int], mode: str, scale: float, fps: float) -> list[bytes]:
        """mp4 bytes of one video per prompt, made on whichever rollout worker is alive."""
        videos = None
        while videos is None:
            self.pool.ensure_live()
            name = self.pool.live()[0]
            videos = self.pool.call_each(
                {name: lambda w: w.sample_videos.remote(prompts, seeds, mode, scale, fps)}
            ).get(name)
        return videos

    def worker_weight_versions(self) -> list[int]:
        """The weight version each rollout worker holds."""
        return list(self.pool.call_each({n: lambda w: w.weight_version.remote() for n in self.pool.workers}).values())

    # -- learning ---------------------------------------------------------------------------------

    def train_from_replay(self, iteration: int, adapter: str, batch_size: int, seed: int) -> list[dict]:
        """One update of `adapter` on every learner rank from a batch drawn from the replay buffer
        (ratio clipping on); each rank's stats."""
        import ray

        return ray.get([x.train_from_replay.remote(iteration, adapter, batch_size, seed, True) for x in self.learners])

    def train_groups(self, iteration: int, refs: list) -> list[dict]:
        """Group i goes to learner rank i mod K; each rank gets its records straight from the object
        store (top-level ObjectRef arguments), the driver never holds them."""
        import ray

        k = len(self.learners)
        calls = []
        for rank, learner in enumerate(self.learners):
            indices = list(range(rank, len(refs), k))
            calls.append(
                learner.train_groups.remote(iteration, "on_policy", indices, len(refs), *[refs[i] for i in indices])
            )
        return ray.get(calls, timeout=self.config.cluster.call_timeout_s)

    # -- checkpoints and adapters -----------------------------------------------------------------

    def save_checkpoint(self, root, state: dict) -> str:
        """A complete checkpoint under `root` (cluster/checkpoints.py): learner rank 0's state and
        adapters, plus the driver's `state`."""
        return write_checkpoint(root, self.learners[0], state)

    def load_checkpoint(self, checkpoint) -> None:
        """Every learner rank loads the checkpoint's learner state (adapters, optimiser, version)."""
        import ray

        ray.get([x.load_state.remote(str(Path(checkpoint) / "learner.pt")) for x in self.learners])

    def save_adapters(self, directory) -> list[str]:
        """The trained adapters as diffusers Wan LoRA files in `directory`; their paths."""
        import ray

        return ray.get(self.learners[0].save.remote(str(directory)))

    # -- accounting ---------------------------------------------------------------------------------

    def busy_ratios(self, wall: float) -> dict[str, float]:
        """Share of wall time each role spent working, averaged over its actors."""
        import ray

        rollout = list(self.pool.call_each({n: lambda w: w.ping.remote() for n in self.pool.workers}).values())
        reward = ray.get([s.get_stats.remote() for s in self.reward_servers])
        learner = ray.get([x.stats.remote() for x in self.learners])
        share = lambda items: sum(i["busy_seconds"] for i in items) / max(len(items), 1) / max(wall, 1e-9)  # noqa: E731
        return {"rollout": share(rollout), "reward": share(reward), "learner": share(learner)}

    def peak_rss_bytes(self) -> dict[str, int]:
        """Each role's peak resident memory so far (the largest over its actors), from their stats."""
        import ray

        rollout = list(self.pool.call_each({n: lambda w: w.ping.remote() for n in self.pool.workers}).values())
        reward = ray.get([s.get_stats.remote() for s in self.reward_servers])
        learner = ray.get([x.stats.remote() for x in self.learners])
        return {
            role: max((i.get("peak_rss_bytes", 0) for i in items), default=0)
            for role, items in (("rollout", rollout), ("reward", reward), ("learner", learner))
        }

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        self.pool.shutdown()
        for actor in [*self.learners, *self.reward_servers, self.controller]:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        for pg in self.placement_groups:
            remove_placement_group(pg)
