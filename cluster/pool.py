"""The rollout pool: rollout workers, the jobs in flight on them, and growing or shrinking the set."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from cluster.controller import Counters
from common.dataflow.jobs import GroupJob, GroupSummary

log = logging.getLogger(__name__)


class RolloutPool:
    """Rollout workers, the jobs in flight on them, and growing or shrinking the set.

    A worker runs one job at a time. A retired worker gets no new job and is killed once its job
    is back, so no group is lost or made twice. A new worker gets the current weights before its
    first job. A job whose worker died is redone once on another worker.

    The run's first workers are started and synced before anything else (`grow`). A replacement,
    or a worker added by scaling up, is only started (`start`): it waits in `starting` until Ray has
    placed and built it, while the others go on working, and joins (synced) at the first poll after
    it is up. One that no node can place yet (the rollout resource gone with a node, an autoscaler
    still adding one) is neither a failure nor replaced again: it is the replacement, waiting.
    """

    def __init__(
        self,
        make_worker: Callable[[str], object],
        sync: Callable[[list], None],
        controller,
        reward_servers: list,
        counters: Counters,
        timeout_s: float,
        heartbeat: tuple[float, float] = (30, 10),
        metrics=None,
    ):
        self.make_worker, self.sync, self.controller = make_worker, sync, controller
        self.reward_servers, self.counters, self.timeout_s = reward_servers, counters, timeout_s
        self.workers: dict[str, object] = {}
        # Started but not yet up: name -> (actor, ref of its first ping, when it was started).
        self.starting: dict[str, tuple[object, object, float]] = {}
        self.busy: dict[str, tuple] = {}  # worker name -> (summary ref, data ref, job, attempt, started)
        self.retiring: set[str] = set()
        self.pending: deque = deque()  # (job, attempt)
        self.results: dict[int, tuple[GroupSummary, object]] = {}
        self.failed: set[int] = set()
        # Summary refs of jobs given up by `abandon_all` while still running: thrown away on return.
        self.abandoned: set = set()
        self.metrics = metrics  # common.metrics.RunMetrics, or None
        self.heartbeat_s, self.heartbeat_timeout_s = heartbeat
        self.last_heartbeat = time.monotonic()
        self.next_index = 0
        self.last_poll = 0.0
        self.events: list[str] = []

    def _new_names(self, count: int) -> list[str]:
        names = [f"rollout-{i}" for i in range(self.next_index, self.next_index + count)]
        self.next_index += count
        self.events.extend(f"+{n}" for n in names)
        return names

    def grow(self, count: int) -> None:
        """Start `count` workers and wait until each has the current weights (the run's first ones)."""
        new = self._new_names(count)
        for name in new:
            self.workers[name] = self.make_worker(name)
        self.sync(new)

    def start(self, count: int) -> None:
        """Start `count` workers without waiting for them: each joins once it is up (`admit_started`)."""
        for name in self._new_names(count):
            actor = self.make_worker(name)
            self.starting[name] = (actor, actor.ping.remote(), time.monotonic())

    def admit_started(self) -> list[str]:
        """Workers started by `start` that are up now join the pool, synced before their first job;
        one whose construction failed is a worker failure (its replacement is started at the next
        poll). Returns the names that joined."""
        import ray
        from ray.exceptions import RayActorError

        if not self.starting:
            return []
        refs = {ref: name for name, (_, ref, _) in self.starting.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        joined = []
        for ref in ready:
            name = refs[ref]
            actor, _, _ = self.starting.pop(name)
            try:
                ray.get(ref)
            except RayActorError as exc:
                self.counters.worker_failures += 1
                self.events.append(f"lost {name}")
                log.error("%s died while starting: %s", name, str(exc).strip().splitlines()[-1])
                continue
            self.workers[name] = actor
            joined.append(name)
        if joined:
            self.sync(joined)
        now = time.monotonic()
        for name, (actor, ref, since) in list(self.starting.items()):
            if now - since > self.timeout_s:  # placed late or never: say so, at most once a call timeout
                log.warning("%s has waited %.0f s to be placed and started", name, now - since)
                self.starting[name] = (actor, ref, now)
        return joined

    def live(self) -> list[str]:
        return [n for n in self.workers if n not in self.retiring]

    def forget(self, name: str) -> None:
        """A worker found dead outside a job (during a sync, an evaluation): drop it; the next
        `ensure_live` (or the pool's own loop) replaces it, synced before its first job."""
        if self.workers.pop(name, None) is not None:
            self.counters.worker_failures += 1
            self.retiring.discard(name)
            self.events.append(f"lost {name}")
            log.warning("%s is dead; it will be replaced", name)

    def ensure_live(self) -> None:
        """Start the workers missing from the target, and wait until at least one is live (a call
        for all of them, an evaluation, cannot go on without one)."""
        import ray

        target = ray.get(self.controller.get_target.remote())["rollout"]
        missing = target - len(self.live()) - len(self.starting)
        if missing > 0:
            self.start(missing)
        self.admit_started()
        while not self.live():
            if not self.starting:
                self.start(1)
            time.sleep(0.2)
            self.admit_started()

    def call_each(self, calls: dict[str, Callable]) -> dict[str, object]:
        """Call every named worker at once (`calls[name](actor) -> ObjectRef`); results of those that
        answered. A dead worker is forgotten, not fatal: the caller redoes its share elsewhere."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        refs = {n: make(self.workers[n]) for n, make in calls.items() if n in self.workers}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=self.timeout_s)
            except RayActorError:
                self.forget(name)
            except GetTimeoutError:  # hung, like a missed heartbeat: replace it rather than stop the run
                log.error("%s did not answer within cluster.call_timeout_s; replacing it", name)
                ray.kill(self.workers[name])
                self.forget(name)
        return out

    def _heartbeat(self, now: float) -> None:
        """Ping the idle workers every cluster.heartbeat_s; one that does not answer within
        cluster.heartbeat_timeout_s (hung, stopped, partitioned) is killed and replaced. Busy
        workers are covered by the call timeout of their job."""
        import ray

        if now - self.last_heartbeat < self.heartbeat_s:
            return
        self.last_heartbeat = now
        idle = [n for n in self.live() if n not in self.busy]
        refs = {self.workers[n].ping.remote(): n for n in idle}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.heartbeat_timeout_s) if refs else ([], [])
        for ref, name in refs.items():
            if ref not in ready:
                log.error("%s missed its heartbeat (%.0f s); replacing it", name, self.heartbeat_timeout_s)
                ray.kill(self.workers[name])
                self.forget(name)
                self.counters.heartbeats_missed += 1

    def _apply_target(self) -> None:
        import ray

        now = time.monotonic()
        if now - self.last_poll < 0.2:
            return
        self.last_poll = now
        self._heartbeat(now)
        self.admit_started()
        target = ray.get(self.controller.get_target.remote())["rollout"]
        live = self.live()
        # Workers still starting count toward the target: a replacement waiting to be placed is not
        # replaced again; on a scale-down they are the first to go.
        excess = len(live) + len(self.starting) - target
        for name in list(self.starting)[::-1][: max(0, excess)]:  # the newest first
            ray.kill(self.starting.pop(name)[0])
            self.events.append(f"-{name}")
        if target > len(live) + len(self.starting):
            self.start(target - len(live) - len(self.starting))
        elif target < len(live):
            # Retire idle workers first, then the newest busy ones.
            order = sorted(live, key=lambda n: (n in self.busy, -int(n.split("-")[1])))
            for name in order[: len(live) - target]:
                self.retiring.add(name)
                self.events.append(f"-{name}")
        for name in [n for n in self.retiring if n not in self.busy]:
            ray.kill(self.workers.pop(name))
            self.retiring.discard(name)

    def submit(self, jobs: list[GroupJob]) -> None:
        self.pending.extend((job, 0) for job in jobs)

    def abandon_all(self) -> int:
        """Forget every job: pending ones, results not yet taken, failures, and those still running
        (their groups are thrown away when they come back, never counted). After a learner restore
        the driver sends the same jobs out again, made with the restored weights. Returns how many
        jobs were given up."""
        running = {v[0] for v in self.busy.values()} - self.abandoned
        count = len(self.pending) + len(self.results) + len(running)
        self.abandoned |= running
        self.pending.clear()
        self.results.clear()
        self.failed.clear()
        return count

    def is_known(self, job_id: int) -> bool:
        return (
            job_id in self.results
            or job_id in self.failed
            or any(j.job_id == job_id for j, _ in self.pending)
            or any(v[2].job_id == job_id for v in self.busy.values() if v[0] not in self.abandoned)
        )

    def run(
        self, jobs: list[GroupJob], on_progress: Callable[[int], None] | None = None
    ) -> list[tuple[GroupSummary, object]]:
        """Submit `jobs` if they are not out yet, work until they are all back; returns (summary,
        record ref) in job order, failed groups left out. Other submitted jobs keep running.
        `on_progress` is told how many of `jobs` have finished (landed or failed) after each wait."""
        ids = {j.job_id for j in jobs}
        self.submit([j for j in jobs if not self.is_known(j.job_id)])
        while not ids <= (self.results.keys() | self.failed):
            self._pump()
            if on_progress is not None:
                on_progress(len(ids & (self.results.keys() | self.failed)))
        return [self.results.pop(j.job_id) for j in jobs if j.job_id in self.results]

    def _pump(self) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        self._apply_target()
        for name in self.live():
            if name in self.busy or not self.pending:
                continue
            job, attempt = self.pending.popleft()
            server = self.reward_servers[job.job_id % len(self.reward_servers)]
            s_ref, d_ref = self.workers[name].collect.options(num_returns=2).remote(job, server)
            self.busy[name] = (s_ref, d_ref, job, attempt, time.monotonic())
        if not self.busy:
            if self.starting:  # nobody to wait on but workers being placed: poll, do not spin
                time.sleep(0.1)
            return
        by_ref = {v[0]: n for n, v in self.busy.items()}
        done, _ = ray.wait(list(by_ref), num_returns=1, timeout=0.5)
        for ref in done:
            name = by_ref[ref]
            _, d_ref, job, attempt, _ = self.busy.pop(name)
            if ref in self.abandoned:
                self._drop_abandoned(name, ref)
                continue
            try:
                summary = ray.get(ref)
            except RayActorError:
                self.counters.worker_failures += 1
                self.workers.pop(name, None)
                self.retiring.discard(name)
                self.events.append(f"lost {name}")
                if attempt == 0:
                    self.counters.jobs_redone += 1
                    self.pending.appendleft((job, 1))
                else:
                    self.failed.add(job.job_id)
                log.warning(
                    "%s died running job %d; %s",
                    name,
                    job.job_id,
                    "redoing it once" if attempt == 0 else "giving it up",
                )
                continue
            except RayTaskError as exc:
                if "RewardError" in str(exc):
                    self.counters.reward_failures += 1
                    if self.metrics:
                        self.metrics.reward_failures.inc()
                    self.failed.add(job.job_id)
                    log.error("job %d: reward failed, group dropped: %s", job.job_id, str(exc).strip().splitlines()[-1])
                    continue
                raise
            self.results[job.job_id] = (summary, d_ref)
            self.counters.groups += 1
            self.counters.groups_by_phase[job.phase] = self.counters.groups_by_phase.get(job.phase, 0) + 1
            if self.metrics:
                m = self.metrics
                m.rollout_groups.labels(job.phase).inc()
                m.rollout_seconds.observe(summary.rollout_seconds)
                m.reward_seconds.observe(summary.reward_seconds)
        if self.metrics:
            self.metrics.queue_depth.labels("pending_jobs").set(len(self.pending))
            self.metrics.queue_depth.labels("in_flight_jobs").set(len(self.busy))
            self.metrics.rollout_workers.set(len(self.live()))
            self.metrics.rollout_workers_starting.set(len(self.starting))
        # A job running past the call timeout fails like a dead worker (and is redone once).
        now = time.monotonic()
        for name, (_, _, job, _, started) in list(self.busy.items()):
            if now - started > self.timeout_s:
                log.error("%s: job %d exceeded cluster.call_timeout_s; killing the worker", name, job.job_id)
                ray.kill(self.workers[name])

    def _drop_abandoned(self, name: str, ref) -> None:
        """An abandoned job came back: its group is not used; a worker that died running it is
        still lost (and replaced)."""
        import ray
        from ray.exceptions import RayActorError

        self.abandoned.discard(ref)
        try:
            ray.get(ref)
        except RayActorError:
            self.counters.worker_failures += 1
            self.workers.pop(name, None)
            self.retiring.discard(name)
            self.events.append(f"lost {name}")
            log.warning("%s died running an abandoned job", name)
        except Exception:  # the group is thrown away whatever went wrong with it
            pass

    def shutdown(self) -> None:
        import ray

        for actor in [*self.workers.values(), *(a for a, _, _ in self.starting.values())]:
            ray.kill(actor)
        self.workers.clear()
        self.starting.clear()
