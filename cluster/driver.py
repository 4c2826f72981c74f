"""The single controller: the AR-CoPO schedule in plain Python, over Ray actors that do the work.

    reference   N reference groups rolled out with pi_ref, inserted into the Redis replay buffer
    semi        the `semi` adapter trained on batches drawn from that fixed buffer (pi_old = pi_ref)
    on_policy   fork / score / update the `on_policy` adapter on fresh groups, weights broadcast
                after every update, groups older than `learner.max_staleness` dropped
    merge       W_base + dW_semi + s * dW_on, s swept and chosen by the dual-improvement rule

The driver handles jobs, summaries and ObjectRefs only: group records travel rollout worker ->
learner (or -> Redis -> learner), weights learner -> object store -> rollout workers.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from common import adapters
from common.jobs import GroupJob, GroupSummary, make_job
from learner.merge import Scores, pick_merge_scale

log = logging.getLogger(__name__)


def phase_seed(run_seed: int, phase: str, iteration: int) -> int:
    digest = hashlib.blake2b(f"{run_seed}/{phase}/{iteration}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


@dataclass
class Counters:
    groups: int = 0
    dropped_stale: int = 0
    reward_failures: int = 0
    worker_failures: int = 0
    jobs_redone: int = 0
    weight_syncs: int = 0
    weight_sync_seconds: float = 0.0
    weight_sync_bytes: int = 0
    stale_trained_max: int = 0
    groups_by_phase: dict[str, int] = field(default_factory=dict)
    heartbeats_missed: int = 0
    # One entry per weight broadcast after an update: {"version", "bytes", "seconds"}.
    weight_sync_log: list[dict] = field(default_factory=list)


def write_checkpoint(root, learner, state: dict) -> str:
    """checkpoints/ckpt-<seq>/ {learner.pt, adapters/, driver.json, COMPLETE}, built in a temporary
    folder and renamed into place, so a crash at any moment leaves either the whole checkpoint or
    none (the newest folder with COMPLETE is what --resume takes)."""
    import json
    import os
    import shutil
    import uuid
    from pathlib import Path

    import ray

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seq = 1 + max([int(p.name.split("-")[1]) for p in root.glob("ckpt-*")] or [0])
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        ray.get([learner.save_state.remote(str(tmp / "learner.pt")), learner.save.remote(str(tmp / "adapters"))])
        body = json.dumps({**state, "seq": seq}, indent=2).encode()
        for name, data in (("driver.json", body), ("COMPLETE", b"ok\n")):
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        final = root / f"ckpt-{seq:06d}"
        os.replace(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def latest_checkpoint(root):
    """The newest complete checkpoint folder, or None."""
    from pathlib import Path

    done = [p for p in Path(root).glob("ckpt-*") if (p / "COMPLETE").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


class Controller:
    """A tiny named actor (`controller`) through which operators change the rollout worker count of a
    running job (`python -m cluster.scale --rollout N`); the driver polls it between jobs."""

    def __init__(self, rollout_workers: int):
        self.target = {"rollout": rollout_workers}
        self.status: dict = {}

    def set_target(self, role: str, count: int) -> dict:
        if role != "rollout":
            raise ValueError(f"only rollout workers scale at run time, not {role!r}")
        if count < 1:
            raise ValueError(f"--rollout must be at least 1, got {count}")
        self.target[role] = count
        return dict(self.target)

    def get_target(self) -> dict:
        return dict(self.target)

    def report(self, status: dict) -> None:
        self.status = status

    def get_status(self) -> dict:
        return dict(self.status)


class RolloutPool:
    """Rollout workers, the jobs in flight on them, and growing or shrinking the set.

    A worker runs one job at a time. A retired worker gets no new job and is killed once its job
    is back, so no group is lost or made twice. A new worker gets the current weights before its
    first job. A job whose worker died is redone once on another worker.
    """

    def __init__(self, make_worker: Callable[[str], object], sync: Callable[[list], None], controller,
                 reward_servers: list, counters: Counters, timeout_s: float, heartbeat: tuple[float, float] = (30, 10)):
        self.make_worker, self.sync, self.controller = make_worker, sync, controller
        self.reward_servers, self.counters, self.timeout_s = reward_servers, counters, timeout_s
        self.workers: dict[str, object] = {}
        self.busy: dict[str, tuple] = {}  # worker name -> (summary ref, data ref, job, started)
        self.retiring: set[str] = set()
        self.pending: deque = deque()  # (job, attempt)
        self.results: dict[int, tuple[GroupSummary, object]] = {}
        self.failed: set[int] = set()
        self.metrics = None  # common.metrics.RunMetrics, set by the job
        self.heartbeat_s, self.heartbeat_timeout_s = heartbeat
        self.last_heartbeat = time.monotonic()
        self.next_index = 0
        self.last_poll = 0.0
        self.events: list[str] = []

    def grow(self, count: int) -> None:
        new = []
        for _ in range(count):
            name = f"rollout-{self.next_index}"
            self.next_index += 1
            self.workers[name] = self.make_worker(name)
            new.append(name)
        self.events.extend(f"+{n}" for n in new)
        self.sync(new)

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
        import ray

        target = ray.get(self.controller.get_target.remote())["rollout"]
        if len(self.live()) < target:
            self.grow(target - len(self.live()))

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
        target = ray.get(self.controller.get_target.remote())["rollout"]
        live = self.live()
        if target > len(live):
            self.grow(target - len(live))
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

    def is_known(self, job_id: int) -> bool:
        return (job_id in self.results or job_id in self.failed or any(j.job_id == job_id for j, _ in self.pending)
                or any(v[2].job_id == job_id for v in self.busy.values()))

    def run(self, jobs: list[GroupJob], on_progress: Callable[[int], None] | None = None
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
            return
        by_ref = {v[0]: n for n, v in self.busy.items()}
        done, _ = ray.wait(list(by_ref), num_returns=1, timeout=0.5)
        for ref in done:
            name = by_ref[ref]
            _, d_ref, job, attempt, _ = self.busy.pop(name)
            try:
                summary = ray.get(ref)
            except RayActorError:
                self.counters.worker_failures += 1
                self.workers.pop(name, None)
                self.retiring.discard(name)
                if attempt == 0:
                    self.counters.jobs_redone += 1
                    self.pending.appendleft((job, 1))
                else:
                    self.failed.add(job.job_id)
                log.warning("%s died running job %d; %s", name, job.job_id,
                            "redoing it once" if attempt == 0 else "giving it up")
                if not self.live():
                    self.grow(1)
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
        # A job running past the call timeout fails like a dead worker (and is redone once).
        now = time.monotonic()
        for name, (_, _, job, _, started) in list(self.busy.items()):
            if now - started > self.timeout_s:
                log.error("%s: job %d exceeded cluster.call_timeout_s; killing the worker", name, job.job_id)
                ray.kill(self.workers[name])

    def shutdown(self) -> None:
        import ray

        for actor in self.workers.values():
            ray.kill(actor)
        self.workers.clear()


class Driver:
    def __init__(self, config, actors, prompts: list[str], heldout: list[str], log_metrics: Callable[[dict], None],
                 progress=None, checkpoint_dir=None):
        self.config = config
        self.actors = actors  # cluster.placement.Actors: learners, reward servers, pool, controller
        self.prompts, self.heldout = prompts, heldout
        self.log_metrics = log_metrics
        self.progress = progress
        self.counters = actors.counters
        self.version = 0
        self.checkpoint_dir = checkpoint_dir
        # Where the schedule stands: completed phases, the current phase and iteration, and what a
        # resumed run must not recompute (the initial evaluation). Saved in every checkpoint.
        self.progress_state: dict = {"completed": []}
        self.metrics = None  # common.metrics.RunMetrics
        self.replay_stats: Callable[[], dict] | None = None
        self.started = time.perf_counter()

    def checkpoint(self, phase: str, it: int, force: bool = False) -> None:
        """Every run.checkpoint_every updates (and at phase ends): everything a resume needs."""
        if self.checkpoint_dir is None or not (force or (it + 1) % self.config.run.checkpoint_every == 0):
            return
        self.progress_state.update(phase=phase, iteration=it + 1)
        write_checkpoint(self.checkpoint_dir, self.actors.learners[0], self.state())

    def state(self) -> dict:
        c = self.counters
        return {**self.progress_state, "version": self.version,
                "counters": {"groups": c.groups, "groups_by_phase": c.groups_by_phase, "dropped_stale": c.dropped_stale,
                             "reward_failures": c.reward_failures, "worker_failures": c.worker_failures,
                             "jobs_redone": c.jobs_redone, "weight_syncs": c.weight_syncs,
                             "stale_trained_max": c.stale_trained_max}}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's driver state (the learners have loaded theirs)."""
        self.version = state["version"]
        self.progress_state = {k: v for k, v in state.items() if k not in ("version", "counters")}
        for key, value in state["counters"].items():
            setattr(self.counters, key, value)
        if self.metrics:
            self.metrics.restore_counters({"rollout_groups": state["counters"]["groups_by_phase"],
                                           "reward_failures": state["counters"]["reward_failures"],
                                           "dropped_stale": state["counters"]["dropped_stale"]})

    def phase_done(self, phase: str) -> None:
        """A phase finished: remember it, and checkpoint so a resume never redoes it."""
        self.progress_state["completed"] = [*self.progress_state["completed"], phase]
        self.progress_state.pop("phase", None)
        self.progress_state.pop("iteration", None)
        if self.checkpoint_dir is not None:
            write_checkpoint(self.checkpoint_dir, self.actors.learners[0], self.state())

    def start_iteration(self, phase: str) -> int:
        """Where a phase (re)starts: 0, or the iteration after the checkpoint it was resumed from."""
        return self.progress_state.get("iteration", 0) if self.progress_state.get("phase") == phase else 0

    # -- weights ----------------------------------------------------------------------------

    def broadcast(self) -> None:
        """Publish the learner's weights once, deliver them to every rollout worker in one call each."""
        self.actors.publish_and_sync(list(self.actors.pool.workers))
        self.counters.weight_syncs += 1
        if self.metrics:
            m = self.metrics
            m.weight_sync_seconds.observe(self.counters.weight_sync_seconds)
            m.weight_sync_bytes.set(self.counters.weight_sync_bytes)
            m.weight_version.labels("learner", "learner-0").set(self.version)
            for name in self.actors.pool.workers:
                m.weight_version.labels("rollout", name).set(self.version)

    # -- evaluation ---------------------------------------------------------------------------

    def eval_set(self) -> tuple[list[str], list[int]]:
        r = self.config.run
        pairs = [(p, 10_000 + s) for p in self.prompts[: r.eval_prompts] for s in range(r.eval_seeds)]
        return [p for p, _ in pairs], [s for _, s in pairs]

    def evaluate(self, mode: str, merge_scale: float = 1.0) -> tuple[Scores, dict[str, float]]:
        """(training reward, OOD score) of a policy on the fixed evaluation set, plus every component."""
        import ray

        prompts, seeds = self.eval_set()
        pool, servers = self.actors.pool, self.actors.reward_servers
        todo = list(range(len(prompts)))
        results: dict[int, dict[str, float]] = {}
        while todo:  # a worker that dies mid-evaluation has its share redone by the others
            pool.ensure_live()
            names = pool.live()
            shares = {n: todo[i::len(names)] for i, n in enumerate(names) if todo[i::len(names)]}
            calls = {n: (lambda idx, k: lambda w: w.evaluate.remote(
                [prompts[i] for i in idx], [seeds[i] for i in idx], mode, merge_scale, servers[k % len(servers)]))(idx, k)
                for k, (n, idx) in enumerate(shares.items())}
            for name, out in pool.call_each(calls).items():
                for j, i in enumerate(shares[name]):
                    results[i] = {k: v[j] for k, v in out.items()}
            todo = [i for i in todo if i not in results]
        per_video: dict[str, list[float]] = {}
        for i in range(len(prompts)):
            for k, v in results[i].items():
                per_video.setdefault(k, []).append(v)
        means = {k: sum(v) / len(v) for k, v in per_video.items()}
        weights = {t.name: t.weight for t in self.config.rewards.terms}
        reward = sum(w * means[n] for n, w in weights.items())
        return Scores(reward, means.get("ood", float("nan"))), means

    # -- phases ---------------------------------------------------------------------------------

    def _jobs(self, phase: str, first: int, count: int, mode: str) -> list[GroupJob]:
        """Job ids are fixed by the schedule (reference i, then on-policy iteration * batch + j), so a
        resumed run makes the very jobs the uninterrupted one would have."""
        offset = 0 if phase == "reference" else self.config.replay.num_reference_groups
        return [make_job(self.config.run.seed, phase, offset + first + i, self.prompts,
                         self.config.sampler.num_chunks, mode) for i in range(count)]

    def collect_reference(self) -> int:
        """Reference groups with pi_ref into the replay buffer; returns how many landed."""
        n = self.config.replay.num_reference_groups

        def show(finished: int) -> None:
            if self.progress is not None:
                self.progress.update(finished - self.progress.n)

        results = self.actors.pool.run(self._jobs("reference", 0, n, "reference"), on_progress=show)
        self.log_metrics({"phase": "reference", "groups": len(results), "job_ids": [s.job_id for s, _ in results],
                          "reward_mean": _mean([s.reward_mean for s, _ in results]),
                          "record_bytes": [s.record_bytes for s, _ in results]})
        return len(results)

    def train_semi(self) -> None:
        import ray

        r = self.config.run
        iterations = r.semi_iterations if r.semi_iterations is not None else r.iterations
        batch = self.config.rollout.prompts_per_iteration
        for it in range(self.start_iteration("semi"), iterations):
            seed = phase_seed(r.seed, "semi", it)
            stats = ray.get([l.train_from_replay.remote(it, "semi", batch, seed, True) for l in self.actors.learners])
            self.version = stats[0]["version"]
            self._log_update("semi", it, stats, [])
            self.checkpoint("semi", it)
        self.broadcast()

    def train_on_policy(self) -> None:
        """Fresh groups each iteration; with max_staleness k, the next k iterations' jobs are already
        out while the learner trains (their groups are then at most k versions old)."""
        import ray

        cfg = self.config
        per_iter, k = cfg.rollout.prompts_per_iteration, cfg.learner.max_staleness
        prefetch = cfg.rollout.prefetch_iterations if cfg.rollout.prefetch_iterations is not None else k
        pool = self.actors.pool
        batches: dict[int, list[GroupJob]] = {}
        for it in range(self.start_iteration("on_policy"), cfg.run.iterations):
            for ahead in range(it, min(cfg.run.iterations, it + 1 + prefetch)):
                if ahead not in batches:
                    batches[ahead] = self._jobs("on_policy", ahead * per_iter, per_iter, "on_policy")
            # Later iterations' jobs (the prefetch) go out now and run while this one trains.
            pool.submit([j for later in sorted(batches) if later != it for j in batches[later]
                         if not pool.is_known(j.job_id)])
            results = pool.run(batches.pop(it))
            fresh, stale = [], []
            for summary, ref in results:
                age = self.version - summary.policy_version
                (fresh if age <= k else stale).append((summary, ref, age))
            self.counters.dropped_stale += len(stale)
            if fresh:
                self.counters.stale_trained_max = max(self.counters.stale_trained_max, max(a for *_, a in fresh))
                stats = self.actors.train_groups(it, [ref for _, ref, _ in fresh])
                self.version = stats[0]["version"]
                self.broadcast()
            else:
                stats = []
            self._log_update("on_policy", it, stats, [s for s, _, _ in fresh], [a for *_, a in fresh],
                             dropped=len(stale))
            self.checkpoint("on_policy", it)

    def merge(self, base: Scores) -> dict:
        sweep = {}
        for scale in self.config.run.merge_scales:
            sweep[scale], _ = self.evaluate("merged", scale)
        chosen = pick_merge_scale(base, sweep)
        # The sweep always includes dW_semi; the on-policy adapter alone is the paper's other row.
        on_policy, _ = self.evaluate(adapters.ON_POLICY)
        return {"merge_scale": chosen if chosen is not None else self.config.run.merge_scale,
                "dual_improvement_passed": chosen is not None,
                "sweep": {str(s): [v.in_domain, v.out_of_domain] for s, v in sweep.items()},
                "on_policy_alone": [on_policy.in_domain, on_policy.out_of_domain]}

    def _log_update(self, phase: str, it: int, stats: list[dict], summaries: list[GroupSummary],
                    ages: list[int] | None = None, dropped: int = 0):
        record = {"phase": phase, "iteration": it, "version": self.version,
                  "groups": len(summaries), "job_ids": [s.job_id for s in summaries], "dropped_stale": dropped,
                  "workers": len(self.actors.pool.live())}
        if summaries:
            record["reward_mean"] = _mean([s.reward_mean for s in summaries])
            record["reward_std_in_group"] = _mean([s.reward_std for s in summaries])
            for name in summaries[0].components:
                record[f"reward/{name}"] = _mean([s.components[name] for s in summaries])
            record["staleness_max"] = max(ages or [0])
            record["rollout_seconds"] = _mean([s.rollout_seconds for s in summaries])
            record["reward_seconds"] = _mean([s.reward_seconds for s in summaries])
            record["record_bytes"] = [s.record_bytes for s in summaries]
        if stats:
            n = sum(s["groups"] for s in stats) or 1
            record["loss"] = sum(s["loss"] * s["groups"] for s in stats) / n
            record["clip_fraction"] = sum(s["clip_fraction"] * s["groups"] for s in stats) / n
            record["grad_norm"] = stats[0]["grad_norm"]
            record["learner_seconds"] = max(s["seconds"] for s in stats)
        record["weight_sync_seconds"] = self.counters.weight_sync_seconds
        record["weight_sync_bytes"] = self.counters.weight_sync_bytes
        self.log_metrics(record)
        if self.metrics:
            self._export(phase, it, record, stats, ages or [], dropped)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix({k: f"{record[k]:.4g}" for k in ("reward_mean", "loss", "clip_fraction") if k in record})


    def _export(self, phase: str, it: int, record: dict, stats: list[dict], ages: list[int], dropped: int) -> None:
        m = self.metrics
        adapter = "semi" if phase == "semi" else "on_policy"
        m.iteration.labels(phase).set(it + 1)
        for key, value in record.items():
            if key.startswith("reward/"):
                m.reward.labels(key.split("/", 1)[1]).set(value)
        if "reward_mean" in record:
            m.reward.labels("total").set(record["reward_mean"])
        if stats:
            m.loss.labels(adapter).set(record["loss"])
            m.clip_fraction.labels(adapter).set(record["clip_fraction"])
            m.learner_step_seconds.labels(adapter).observe(record["learner_seconds"])
        for age in ages:
            m.staleness.observe(age)
        if dropped:
            m.dropped_stale.inc(dropped)
        if self.replay_stats is not None:
            replay = self.replay_stats()
            m.replay_size.set(replay["size"])
            m.replay_inserts.set(replay["inserts"])
            m.replay_samples.set(replay["samples"])
        for role, ratio in self.actors.busy_ratios(time.perf_counter() - self.started).items():
            m.busy_ratio.labels(role).set(ratio)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
