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


def role_bundles(config: Config) -> list[dict[str, float]]:
    """One resource bundle per actor the roles start (every rollout worker, reward server and learner
    rank): the shapes an autoscaler has to find nodes for."""
    r, w, lrn = config.rollout, config.rewards, config.learner
    shapes = (
        (r.num_workers, {"CPU": r.num_cpus_per_worker, "GPU": r.num_gpus_per_worker, **r.resources}),
        (w.num_servers, {"CPU": w.num_cpus_per_server, "GPU": w.num_gpus_per_server, **w.resources}),
        (lrn.num_workers, {"CPU": lrn.num_cpus_per_worker, "GPU": lrn.num_gpus_per_worker, **lrn.resources}),
    )
    return [{k: float(v) for k, v in shape.items() if v} for count, shape in shapes for _ in range(count)]


def _needed(config: Config) -> dict[str, float]:
    need = {"CPU": 0.0, "GPU": 0.0}
    for bundle in role_bundles(config):
        for resource, amount in bundle.items():
            need[resource] = need.get(resource, 0.0) + amount
    return need


def missing_resources(config: Config, available: dict) -> dict[str, float]:
    """What the roles need beyond `available` ({resource: amount short}; empty when they fit)."""
    return {
        resource: amount - available.get(resource, 0.0)
        for resource, amount in _needed(config).items()
        if amount > available.get(resource, 0.0) + 1e-9
    }


def check_resources(config: Config, available: dict) -> None:
    """Refuse, before any actor starts, a config that asks for more than the cluster has."""
    r, w, lrn = config.rollout, config.rewards, config.learner
    for resource, amount in _needed(config).items():
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


def cluster_autoscales() -> bool:
    """Whether an autoscaler adds nodes to this cluster on demand, as Ray's own state says: the node
    groups the autoscaler reported (v2, KubeRay), one of which can grow, or the report of the v1
    autoscaler (`ray up`, KubeRay) naming node types of a cluster config. Every head runs a v1 monitor;
    on a cluster of `ray start`ed nodes it manages nothing and names each node's type after its id."""
    import json
    import re

    import ray._private.state
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    try:
        config = ray._private.state.state.get_cluster_config()
        if config is not None and config.node_group_configs:
            return any(
                g.max_count == -1 or g.max_count > g.min_count
                for g in config.node_group_configs
                if g.resources and g.max_count != 0
            )
        status = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(status) if status else {}).get("autoscaler_report") or {}
        types = {
            *(report.get("active_nodes") or {}),
            *(report.get("pending_launches") or {}),
            *(report.get("node_type_mapping") or {}).values(),
        }
        return any(not re.fullmatch(r"node_[0-9a-f]{56}", t) for t in types)
    except Exception as exc:  # noqa: BLE001 - no answer: a fixed cluster, as before
        log.warning("could not tell whether the cluster autoscales (%s); treating it as fixed", exc)
        return False


def _describe(short: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" if k in ("CPU", "GPU") else f"{v:g} of {k!r}" for k, v in short.items())


def wait_for_resources(config: Config, poll_s: float = 1.0, report_s: float = 30.0) -> None:
    """`check_resources` against the cluster. On a fixed cluster a config that does not fit is
    refused at once. On an autoscaling one (cluster.autoscaling; `auto`: `cluster_autoscales`) the
    autoscaler is asked for every role's bundle (ray.autoscaler.sdk.request_resources: nothing is
    pending yet that would make it scale) and the job waits up to cluster.resource_wait_s for the
    nodes, saying every `report_s` what is still missing; then it is refused with the same message,
    plus the wait."""
    import ray

    c = config.cluster
    try:
        check_resources(config, ray.cluster_resources())
        return
    except PlacementError:
        autoscaling = cluster_autoscales() if c.autoscaling == "auto" else c.autoscaling
        if not autoscaling:
            raise
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=role_bundles(config))
    start = time.monotonic()
    next_report = start
    try:
        while True:
            available = ray.cluster_resources()
            short = missing_resources(config, available)
            waited = time.monotonic() - start
            if not short:
                log.info("the cluster has the roles' resources after %.0f s", waited)
                return
            if waited >= c.resource_wait_s:
                try:
                    check_resources(config, available)
                except PlacementError as exc:
                    raise PlacementError(
                        f"{exc} (waited {waited:.0f} s, cluster.resource_wait_s, for the autoscaling "
                        f"cluster to add {_describe(short)})"
                    ) from None
            if time.monotonic() >= next_report:
                log.warning(
                    "waiting for the autoscaler: the roles miss %s; waited %.0f of %g s (cluster.resource_wait_s)",
                    _describe(short),
                    waited,
                    c.resource_wait_s,
                )
                next_report += report_s
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])  # the request persists until replaced; the actors hold the nodes now


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
    wait_for_resources(config)
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
        wait_for_resources(config)
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

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node (the head under `ray job submit`), which lives as long as the job: left
        # to Ray it lands on any node, and a rollout node scaled down or preempted took the run with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.controller = (
            ray.remote(Controller)
            .options(name="controller", namespace=ns, num_cpus=0, scheduling_strategy=here)
            .remote(r.num_workers)
        )
        self.last_packet = None
        # The collective transport's group: its generation, members, and the driver's connection to
        # its store (to abort a generation); what the last sync reported (attempts, workers lost).
        self._generation, self._members, self._control, self._store_address = -1, None, None, None
        self._sync_report: dict = {}
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
        self._members, self._control = None, None
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
        """One broadcast of learner rank 0's weights to every rollout worker, over the current
        generation of the weight group (formed again whenever the set of workers changed).

        Membership may change under it: a worker that dies (or does not answer within
        cluster.call_timeout_s) during the rendezvous or the broadcast is dropped from the pool (and
        replaced, synced, before the next job); the generation is aborted at once, so no member waits
        on it until gloo's timeout; the broadcast is repeated over a new generation of the survivors
        unless they all had the packet already. A worker added later joins at the next generation
        (pool.grow syncs it). The run goes on; `weight_sync_workers_lost` and `weight_sync_retries`
        count it, and the sync's log entry says how many attempts it took and whom it lost."""
        import ray

        handle = ray.get(self.learners[0].pack_weights.remote(), timeout=self.config.cluster.call_timeout_s)
        lost: list[str] = []
        attempts = fruitless = 0
        while True:
            members = tuple(sorted(self.pool.workers))
            if not members:  # all gone: their replacements are synced as the pool adds them
                break
            attempts += 1
            before = len(lost)
            failed = self._form_group(members, lost) if members != self._members else []
            if not failed:
                failed = self._send(handle, members, lost)
                if not failed:
                    break
            self._members = None  # the next attempt (and the next sync) forms a new generation
            self.counters.weight_sync_retries += 1
            fruitless = fruitless + 1 if len(lost) == before else 0
            if fruitless > 2:  # failures that no lost worker explains: not a membership change
                raise RuntimeError(
                    f"weight broadcast of v{handle.version} failed {fruitless} times in a row with every "
                    f"rollout worker alive ({', '.join(failed)}; see their logs)"
                )
            log.warning(
                "weight sync of v%d, attempt %d: %s lost, %s failed; again over a new group",
                handle.version,
                attempts,
                ", ".join(lost[before:]) or "no worker",
                ", ".join(n for n in failed if n not in lost) or "nobody else",
            )
        self._sync_report = {"version": handle.version, "attempts": attempts, "lost": lost}
        return handle.nbytes

    def _form_group(self, members: tuple[str, ...], lost: list[str]) -> list[str]:
        """A new generation of the weight group: learner rank 0 and `members` (ranks 1..N). Returns
        who failed (empty: formed); a member that died or hung is dropped, in `lost`."""
        import ray

        self._generation += 1
        generation, world = self._generation, len(members) + 1
        learner, workers = self.learners[0], self.pool.workers
        store = tuple(ray.get(learner.weights_store.remote(), timeout=self.config.cluster.call_timeout_s))
        calls = {learner.form_weights_group.remote(generation, world): None}
        for i, name in enumerate(members):
            calls[workers[name].join_weights_group.remote(*store, generation, i + 1, world)] = name
        failed = self._collect(calls, generation, store, lost)
        if not failed:
            self._members, self._store_address = members, store
        return failed

    def _send(self, handle, members: tuple[str, ...], lost: list[str]) -> list[str]:
        """The broadcast over the current generation. Returns the survivors (or "learner-0") that
        did not get or send the packet: empty when everyone alive has it, even if a member died."""
        generation, workers = self._generation, self.pool.workers
        calls = {self.learners[0].broadcast_weights.remote(generation): None}
        for name in members:
            calls[workers[name].receive_weights.remote(handle, generation)] = name
        failed = self._collect(calls, generation, self._store_address, lost, expect=handle.version)
        return [n for n in failed if n not in lost]

    def _collect(self, calls: dict, generation: int, store: tuple, lost: list[str], expect=None) -> list[str]:
        """Wait for one generation's calls ({ref: worker name, or None for learner rank 0}); returns
        the names of those that failed ("learner-0" for rank 0). At the first failure the generation
        is aborted, so every member still waiting in it gives up at once (gloo alone would wait for
        its timeout). A worker that died is dropped from the pool; one that does not answer within
        cluster.call_timeout_s is killed and dropped (both go to `lost`). Learner rank 0 dead, or
        still out after that (plus a grace to take the abort), raises: the driver's learner recovery
        takes over. Any error but a failed group raises too, after the abort."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        from common.dataflow.weights import WeightGroupError

        failed: list[str] = []

        def fail(name: str | None) -> None:
            if not failed:
                self._abort(generation, store)
            failed.append(name or "learner-0")

        timeout = self.config.cluster.call_timeout_s
        deadline, pending, overdue = time.monotonic() + timeout, list(calls), False
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:  # past the deadline: the workers still out are hung
                if overdue:
                    raise GetTimeoutError(
                        f"learner-0 did not finish weight group generation {generation} within "
                        f"cluster.call_timeout_s ({timeout:g} s)"
                    )
                for ref in [r for r in pending if calls[r] is not None]:
                    name = calls[ref]
                    log.error("%s did not answer the weight sync within cluster.call_timeout_s; replacing it", name)
                    if name in self.pool.workers:
                        ray.kill(self.pool.workers[name])
                    self._lose(name, lost)
                    fail(name)
                pending = [r for r in pending if calls[r] is None]  # learner rank 0, told to give up
                deadline, overdue = time.monotonic() + min(timeout, 30.0), True
                continue
            for ref in ready:
                name = calls[ref]
                try:
                    value = ray.get(ref)
                except RayActorError:
                    if name is None:
                        raise
                    self._lose(name, lost)
                    fail(name)
                    continue
                except RayTaskError as exc:
                    if not isinstance(exc, WeightGroupError) and not isinstance(exc.cause, WeightGroupError):
                        self._abort(generation, store)
                        raise
                    fail(name)
                    continue
                if expect is not None and value != expect:
                    self._abort(generation, store)
                    raise RuntimeError(f"weight broadcast: {name or 'learner-0'} reports v{value}, expected v{expect}")
        return failed

    def _lose(self, name: str, lost: list[str]) -> None:
        """A rollout worker that died or hung in a weight sync: out of the pool and of the sync."""
        self.pool.forget(name)
        self.counters.weight_sync_workers_lost += 1
        lost.append(name)

    def _abort(self, generation: int, store: tuple) -> None:
        """Set the abort key of `generation` in the weight groups' store (learner rank 0 hosts it)."""
        from common.dataflow.weights import abort_generation, connect_store

        try:
            if self._control is None or self._control[0] != store:
                self._control = (store, connect_store(*store, 30.0))
            abort_generation(self._control[1], generation)
        except Exception as exc:  # noqa: BLE001 - the store died with learner rank 0: nobody is left to tell
            log.warning("could not abort weight group generation %d: %s", generation, exc)
            self._control = None

    def publish_and_sync(self, names=None) -> None:
        """Publish the learner's weights once and deliver them to `names` (every rollout worker by
        default); the packet's size and the time taken go to the counters."""
        names = list(self.pool.workers) if names is None else names
        start = time.perf_counter()
        self.publish()
        self.counters.weight_sync_bytes = self.sync_to(list(names))
        self.counters.weight_sync_seconds = time.perf_counter() - start
        version = self.last_packet[0].version if self.last_packet is not None else self._sync_report.get("version")
        self.counters.weight_sync_log.append(
            {
                "version": version,
                "bytes": self.counters.weight_sync_bytes,
                "seconds": self.counters.weight_sync_seconds,
                **{k: v for k, v in self._sync_report.items() if k != "version"},
            }
        )

    # -- rollout workers ----------------------------------------------------------------------

    def rollout_workers(self) -> list[str]:
        """Names of the rollout workers held now (retiring ones included)."""
        return list(self.pool.workers)

    def starting_rollout_workers(self) -> list[str]:
        """Names of the rollout workers started but not up yet (waiting to be placed, or building)."""
        return list(self.pool.starting)

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
