"""The single controller: the AR-CoPO schedule in plain Python (docs/method.md), over the roles of a
run (cluster/placement.py: RunRoles) that do the work. `Driver.fit` is the whole schedule:

    evaluation  pi_ref on the fixed evaluation set, and the start samples (once per run)
    reference   N reference groups rolled out with pi_ref, inserted into the Redis replay buffer
    semi        the `semi` adapter trained on batches drawn from that fixed buffer (pi_old = pi_ref)
    on_policy   fork / score / update the `on_policy` adapter on fresh groups, weights broadcast
                after every update, groups older than `learner.max_staleness` dropped
    merge       W_base + dW_semi + s * dW_on, s swept and chosen by the dual-improvement rule
    evaluation  the final policy on the same set, and the end samples

The phases named in run.phases run, always in this order; a checkpoint after every phase (and every
run.checkpoint_every updates) lets a resumed run continue where it stopped. A learner that dies is
replaced inside the job and restored from the newest complete checkpoint, and the iterations after
it are redone with the same jobs (Driver.recover; run.max_learner_restarts).

The driver handles jobs, summaries and ObjectRefs only: group records travel rollout worker ->
learner (or -> Redis -> learner), weights learner -> object store -> rollout workers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.checkpoints import latest_checkpoint, read_checkpoint_state
from cluster.controller import Counters
from common.dataflow.jobs import GroupJob, GroupSummary, make_job
from common.evaluation import EvalSet, Scores
from common.model import adapters
from common.seeds import derive_seed
from learner.merge import pick_merge_scale, unresolved_margins
from rewards.combine import policy_scores

if TYPE_CHECKING:
    from common.config import Config

log = logging.getLogger(__name__)

SAMPLE_FPS = 8.0
SAMPLE_SEED = 7

# The counters a checkpoint holds. An in-job learner restore puts them back to the checkpoint's,
# except the fault tallies: those count events that happened (a rollout worker lost, a learner
# group replaced) and are not redone with the iterations.
CHECKPOINTED_COUNTERS = (
    "groups",
    "groups_by_phase",
    "dropped_stale",
    "reward_failures",
    "worker_failures",
    "jobs_redone",
    "weight_syncs",
    "stale_trained_max",
    "learner_restarts",
    "weight_sync_workers_lost",
    "weight_sync_retries",
)
FAULT_TALLIES = (
    "worker_failures",
    "jobs_redone",
    "learner_restarts",
    "weight_sync_workers_lost",
    "weight_sync_retries",
)
# The phases whose metrics.jsonl records a learner restore can roll back.
UPDATE_PHASES = ("reference", "semi", "on_policy")
# How long every learner rank has to answer after an error, before the group counts as broken.
LEARNER_LIVENESS_S = 30.0


def phase_seed(run_seed: int, phase: str, iteration: int) -> int:
    return derive_seed(f"{run_seed}/{phase}/{iteration}", bits=62)


def final_policy(phases: list[str]) -> tuple[str, float]:
    """The policy evaluated at the end when there is no merge phase: the last adapter trained."""
    if "on_policy" in phases:
        return "on_policy", 1.0
    if "semi" in phases:
        return "semi", 1.0
    return "reference", 1.0


@dataclass
class FitResult:
    """What the schedule produced, for the run's summary."""

    before: Scores  # pi_ref on the evaluation set
    before_parts: dict[str, float]
    after: Scores  # the final policy on the same set
    after_parts: dict[str, float]
    final_policy: str  # reference, semi, on_policy or merged
    merge_scale: float
    merge: dict  # the merge phase's choice and sweep ({} without it)
    samples: dict[str, list[str]]  # {"start": [...], "end": [...]}, as save_samples named them


def _no_bar(**_kwargs):
    return contextlib.nullcontext(None)


class Driver:
    """The schedule of one run. Collaborators, all given here:

    roles          cluster.placement.RunRoles: learners, reward servers, rollout pool, controller
    counters       cluster.controller.Counters, the same object the roles add to
    prompts        training prompts (in-domain evaluation and sample prompts are their first ones)
    heldout        held-out prompts, never trained on (the out-of-domain evaluation's are their first ones)
    log_metrics    takes one record per iteration, phase and evaluation (metrics.jsonl)
    save_samples   (tag, prompts, mp4 bytes) -> the paths it wrote them to
    metrics        common.metrics.RunMetrics, or None
    replay_stats   () -> the replay buffer's {size, inserts, samples}, or None
    progress_bar   tqdm-like factory (total=, initial=, desc=, leave=) of a context manager, or None
    checkpoint_dir where checkpoints go, or None for none
    """

    def __init__(
        self,
        config: Config,
        roles,
        counters: Counters,
        prompts: list[str],
        *,
        log_metrics: Callable[[dict], None],
        save_samples: Callable[[str, list[str], list[bytes]], list[str]],
        metrics=None,
        replay_stats: Callable[[], dict] | None = None,
        progress_bar=None,
        checkpoint_dir=None,
        heldout: list[str] = (),
    ):
        self.config = config
        self.roles = roles
        self.counters = counters
        self.prompts = prompts
        self.eval_set = EvalSet.from_config(config, prompts, heldout)
        self.log_metrics = log_metrics
        self.save_samples = save_samples
        self.metrics = metrics
        self.replay_stats = replay_stats
        self.progress_bar = progress_bar or _no_bar
        self.checkpoint_dir = checkpoint_dir
        self.version = 0
        # Where the schedule stands: completed phases, the current phase and iteration, and what a
        # resumed run must not recompute (the initial evaluation). Saved in every checkpoint.
        self.progress_state: dict = {"completed": []}
        self.started = time.perf_counter()

    # -- the schedule ---------------------------------------------------------------------------

    def fit(self, resume_from=None) -> FitResult:
        """The whole run (docs/method.md sections 2-5): evaluate pi_ref, then reference -> semi ->
        on_policy -> merge (those in run.phases), then evaluate the final policy. `resume_from`, a
        checkpoint folder, continues an interrupted run: completed phases are skipped and the
        current one restarts at the iteration after the checkpoint."""
        cfg = self.config
        phases = cfg.run.phases
        if resume_from is not None:
            self.resume(resume_from)

        # The base policy, once per run (a resumed run keeps the first run's numbers and samples).
        if "before" not in self.progress_state:
            before, before_parts = self.evaluate("reference")
            self._log_eval("reference", before, before_parts)
            self.progress_state["before"] = {
                "in_domain": list(before.in_domain.values),
                "out_of_domain": list(before.out_of_domain.values),
                "parts": before_parts,
            }
            self.progress_state["samples_start"] = self.samples("start", "reference", 1.0)
        b = self.progress_state["before"]
        before, before_parts = Scores(b["in_domain"], b["out_of_domain"]), b["parts"]
        samples = {"start": self.progress_state["samples_start"]}

        # Sections 2-4, where a learner that dies is replaced and restored (recover) and the schedule
        # goes on from the restored checkpoint.
        self.with_learner_recovery(self.train_phases)

        # Section 5: the merge scale by the dual-improvement rule, then the final policy's scores.
        mode, scale = final_policy(phases)
        merge_info: dict = {}
        if "merge" in phases:
            merge_info = self.merge(before)
            mode, scale = "merged", merge_info["merge_scale"]
        after, after_parts = self.evaluate(mode, scale)
        self._log_eval(mode, after, after_parts, merge_scale=scale)
        samples["end"] = self.samples("end", mode, scale)
        return FitResult(before, before_parts, after, after_parts, mode, scale, merge_info, samples)

    def train_phases(self) -> None:
        """reference -> semi -> on_policy (those in run.phases and not completed), each from where
        progress_state says it stands."""
        cfg = self.config
        phases = cfg.run.phases
        done = self.progress_state["completed"]

        # Section 4: the fixed reference buffer, then the semi adapter trained on it.
        if "reference" in phases and "reference" not in done:
            with self.progress_bar(
                total=cfg.replay.num_reference_groups, desc="reference buffer (groups)", leave=False
            ) as bar:
                landed = self.collect_reference(bar)
            log.info("reference buffer: %d groups", landed)
            self.phase_done("reference")
        if "semi" in phases and "semi" not in done:
            with self.progress_bar(
                total=self.semi_iterations(), initial=self.start_iteration("semi"), desc="semi-on-policy"
            ) as bar:
                self.train_semi(bar)
            self.phase_done("semi")

        # Sections 2-3: on-policy updates on fresh groups.
        if "on_policy" in phases and "on_policy" not in done:
            with self.progress_bar(
                total=cfg.run.iterations, initial=self.start_iteration("on_policy"), desc="on-policy"
            ) as bar:
                self.train_on_policy(bar)
            self.phase_done("on_policy")

    def save_adapters(self, directory) -> list[str]:
        """The trained adapters as diffusers Wan LoRA files in `directory` (learner rank 0 writes them).
        A learner that died since the last phase is replaced and restored first; train_phases then
        redoes whatever the restored checkpoint does not hold (nothing, after the last phase's)."""

        def save() -> list[str]:
            self.train_phases()
            return self.roles.save_adapters(directory)

        return self.with_learner_recovery(save)

    def samples(self, tag: str, mode: str, scale: float) -> list[str]:
        """Sample videos of the first run.sample_prompts prompts, handed to save_samples."""
        prompts = self.prompts[: self.config.run.sample_prompts]
        if not prompts:
            return []
        videos = self.roles.sample_videos(prompts, [SAMPLE_SEED] * len(prompts), mode, scale, SAMPLE_FPS)
        return self.save_samples(tag, prompts, videos)

    def _log_eval(self, policy: str, scores: Scores, parts: dict[str, float], **extra) -> None:
        self.log_metrics(
            {
                "phase": "eval",
                "policy": policy,
                **extra,
                "reward": scores.in_domain.mean,
                "reward_stderr": scores.in_domain.stderr,
                "ood": scores.out_of_domain.mean,
                "ood_stderr": scores.out_of_domain.stderr,
                "videos": len(self.eval_set.pairs),
                **{f"reward/{k}": v for k, v in parts.items()},
            }
        )

    # -- checkpoints and resume ---------------------------------------------------------------

    def checkpoint(self, phase: str, it: int, force: bool = False) -> None:
        """Every run.checkpoint_every updates (and at phase ends): everything a resume needs."""
        if self.checkpoint_dir is None or not (force or (it + 1) % self.config.run.checkpoint_every == 0):
            return
        self.progress_state.update(phase=phase, iteration=it + 1)
        self.roles.save_checkpoint(self.checkpoint_dir, self.state())

    def state(self) -> dict:
        return {**self.progress_state, "version": self.version, "counters": _counter_state(self.counters)}

    def initial_state(self) -> dict:
        """The state before any phase: what a learner restore goes back to when no checkpoint is
        complete yet (the base policy's scores and start samples are kept: they are pi_ref's)."""
        kept = {k: self.progress_state[k] for k in ("before", "samples_start") if k in self.progress_state}
        return {"completed": [], **kept, "version": 0, "counters": _counter_state(Counters())}

    def resume(self, checkpoint) -> None:
        """Continue from a checkpoint: the learners load theirs, the driver its state, and the rollout
        workers get the checkpoint's weights."""
        checkpoint = Path(checkpoint)
        state = read_checkpoint_state(checkpoint)
        self.roles.load_checkpoint(checkpoint)
        self.restore(state)
        self.broadcast()
        log.info(
            "resumed from %s: phase %s, iteration %s, weight version %d",
            checkpoint.name,
            state.get("phase"),
            state.get("iteration"),
            self.version,
        )
        self.log_metrics({"phase": "resume", "checkpoint": checkpoint.name, "version": self.version})

    def restore(self, state: dict, in_job: bool = False) -> None:
        """Continue from a checkpoint's driver state (the learners have loaded theirs). `in_job`: a
        learner restore inside this job, which keeps the fault tallies and the Prometheus counters
        (those only go up, and count the work the lost iterations did too)."""
        self.version = state["version"]
        self.progress_state = {k: v for k, v in state.items() if k not in ("version", "counters")}
        for key, value in state["counters"].items():
            if not (in_job and key in FAULT_TALLIES):
                setattr(self.counters, key, value)
        if self.metrics and not in_job:
            self.metrics.restore_counters(
                {
                    "rollout_groups": state["counters"]["groups_by_phase"],
                    "reward_failures": state["counters"]["reward_failures"],
                    "dropped_stale": state["counters"]["dropped_stale"],
                }
            )

    def _rollback_point(self) -> dict:
        """Where the schedule stands after a learner restore, as its metrics.jsonl record says it:
        every record of a phase not in `completed`, at or after `at`, written before, was rolled back
        (surviving_rows leaves them out)."""
        point: dict = {"completed": list(self.progress_state["completed"])}
        if "phase" in self.progress_state:
            point["at"] = {"phase": self.progress_state["phase"], "iteration": self.progress_state["iteration"]}
        return point

    # -- a learner that dies ----------------------------------------------------------------------

    def with_learner_recovery(self, step: Callable):
        """step(), and again after each learner restore (recover) while run.max_learner_restarts
        allows: `step` must continue from the driver's state, which the restore puts back."""
        while True:
            try:
                return step()
            except Exception as exc:
                self._recover_or_raise(exc)

    def _recover_or_raise(self, exc: Exception) -> None:
        """After `exc`: when a learner rank is dead (or stuck) and restarts are left, replace the group
        and restore it (recover); otherwise raise `exc` (the job ends with the --resume hint)."""
        limit = self.config.run.max_learner_restarts
        while True:
            if limit == 0 or self.roles.learners_alive(LEARNER_LIVENESS_S):
                raise exc
            if self.counters.learner_restarts >= limit:
                log.error("a learner died again, after %d restarts (run.max_learner_restarts)", limit)
                raise exc
            self.counters.learner_restarts += 1
            try:
                self.recover(_describe(exc))
                return
            except Exception as again:  # a learner that died during the restore: try again, bounded
                exc = again

    def recover(self, cause: str = "a learner died") -> None:
        """Replace the learner group and go back to the newest complete checkpoint (or the start):

        1. every learner rank is killed and started again, and the process group formed anew;
        2. the ranks load the newest complete checkpoint (none: they keep their fresh weights, which
           are the run's initial ones);
        3. every job out on the rollout workers is given up, its group thrown away when it returns;
        4. a reference phase the checkpoint does not hold as completed has its partial buffer cleared
           (it is collected again: same jobs, same groups);
        5. the driver's state goes back to the checkpoint's: weight version, phase, iteration, counters
           (but the fault tallies);
        6. the restored weights are broadcast to every rollout worker, before any new job.

        The caller then redoes every iteration after the checkpoint with the same jobs (job ids are
        fixed by the schedule), so each group is trained once in the weights that survive."""
        log.warning(
            "%s; restarting the learner group (restart %d of at most %d, run.max_learner_restarts)",
            cause,
            self.counters.learner_restarts,
            self.config.run.max_learner_restarts,
        )
        self.roles.restart_learners()
        checkpoint = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        if checkpoint is not None:
            self.roles.load_checkpoint(checkpoint)
            state = read_checkpoint_state(checkpoint)
        else:
            state = self.initial_state()
        abandoned = self.roles.discard_rollouts()
        if "reference" in self.config.run.phases and "reference" not in state["completed"]:
            cleared = self.roles.clear_replay()
            log.info("reference phase not checkpointed: cleared %d buffer items, collecting again", cleared)
        self.restore(state, in_job=True)
        self.broadcast()
        where = (
            f"{state['phase']} iteration {state['iteration']}"
            if "phase" in state
            else f"completed phases {state['completed']}"
        )
        log.warning(
            "learner group restored from %s: %s, weight version %d (%d jobs given up); redoing what followed",
            checkpoint.name if checkpoint is not None else "the start of the run",
            where,
            self.version,
            abandoned,
        )
        self.log_metrics(
            {
                "phase": "restore",
                "cause": cause,
                "checkpoint": checkpoint.name if checkpoint is not None else None,
                "version": self.version,
                "learner_restarts": self.counters.learner_restarts,
                "jobs_given_up": abandoned,
                **self._rollback_point(),
            }
        )

    def phase_done(self, phase: str) -> None:
        """A phase finished: remember it, and checkpoint so a resume never redoes it."""
        self.progress_state["completed"] = [*self.progress_state["completed"], phase]
        self.progress_state.pop("phase", None)
        self.progress_state.pop("iteration", None)
        if self.checkpoint_dir is not None:
            self.roles.save_checkpoint(self.checkpoint_dir, self.state())

    def start_iteration(self, phase: str) -> int:
        """Where a phase (re)starts: 0, or the iteration after the checkpoint it was resumed from."""
        return self.progress_state.get("iteration", 0) if self.progress_state.get("phase") == phase else 0

    # -- weights ----------------------------------------------------------------------------

    def broadcast(self) -> None:
        """Publish the learner's weights once, deliver them to every rollout worker in one call each."""
        self.roles.publish_and_sync()
        self.counters.weight_syncs += 1
        if self.metrics:
            m = self.metrics
            m.weight_sync_seconds.observe(self.counters.weight_sync_seconds)
            m.weight_sync_bytes.set(self.counters.weight_sync_bytes)
            m.weight_version.labels("learner", "learner-0").set(self.version)
            for name in self.roles.rollout_workers():
                m.weight_version.labels("rollout", name).set(self.version)

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, mode: str, merge_scale: float = 1.0) -> tuple[Scores, dict[str, float]]:
        """(in-domain, out-of-domain) Scores of a policy on the run's fixed evaluation set
        (common/evaluation.py), plus every component's mean."""
        rows = self.roles.evaluate(self.eval_set.prompts, self.eval_set.seeds, mode, merge_scale)
        per_video = {k: [row[k] for row in rows] for k in rows[0]} if rows else {}
        return policy_scores(self.eval_set, per_video, self.config)

    # -- phases ---------------------------------------------------------------------------------

    def _jobs(self, phase: str, first: int, count: int, mode: str) -> list[GroupJob]:
        """Job ids are fixed by the schedule (reference i, then on-policy iteration * batch + j), so a
        resumed run makes the very jobs the uninterrupted one would have."""
        offset = 0 if phase == "reference" else self.config.replay.num_reference_groups
        return [
            make_job(
                self.config.run.seed, phase, offset + first + i, self.prompts, self.config.sampler.num_chunks, mode
            )
            for i in range(count)
        ]

    def collect_reference(self, bar=None) -> int:
        """Reference groups with pi_ref into the replay buffer; returns how many landed."""
        n = self.config.replay.num_reference_groups

        def show(finished: int) -> None:
            if bar is not None:
                bar.update(finished - bar.n)

        results = self.roles.collect(self._jobs("reference", 0, n, "reference"), on_progress=show)
        self.log_metrics(
            {
                "phase": "reference",
                "groups": len(results),
                "job_ids": [s.job_id for s, _ in results],
                "reward_mean": _mean([s.reward_mean for s, _ in results]),
                "record_bytes": [s.record_bytes for s, _ in results],
            }
        )
        return len(results)

    def semi_iterations(self) -> int:
        r = self.config.run
        return r.semi_iterations if r.semi_iterations is not None else r.iterations

    def train_semi(self, bar=None) -> None:
        """run.semi_iterations updates of the semi adapter on batches from the reference buffer."""
        r = self.config.run
        batch = self.config.rollout.prompts_per_iteration
        for it in range(self.start_iteration("semi"), self.semi_iterations()):
            seed = phase_seed(r.seed, "semi", it)
            stats = self.roles.train_from_replay(it, "semi", batch, seed)
            self.version = stats[0]["version"]
            self._log_update("semi", it, stats, [], bar=bar)
            self.checkpoint("semi", it)
        self.broadcast()

    def train_on_policy(self, bar=None) -> None:
        """Fresh groups each iteration; with max_staleness k, the next k iterations' jobs are already
        out while the learner trains (their groups are then at most k versions old)."""
        cfg = self.config
        per_iter, k = cfg.rollout.prompts_per_iteration, cfg.learner.max_staleness
        prefetch = cfg.rollout.prefetch_iterations if cfg.rollout.prefetch_iterations is not None else k
        batches: dict[int, list[GroupJob]] = {}
        for it in range(self.start_iteration("on_policy"), cfg.run.iterations):
            for ahead in range(it, min(cfg.run.iterations, it + 1 + prefetch)):
                if ahead not in batches:
                    batches[ahead] = self._jobs("on_policy", ahead * per_iter, per_iter, "on_policy")
            # Later iterations' jobs (the prefetch) go out now and run while this one trains.
            self.roles.prefetch([j for later in sorted(batches) if later != it for j in batches[later]])
            results = self.roles.collect(batches.pop(it))
            fresh, stale = [], []
            for summary, ref in results:
                age = self.version - summary.policy_version
                (fresh if age <= k else stale).append((summary, ref, age))
            self.counters.dropped_stale += len(stale)
            if fresh:
                self.counters.stale_trained_max = max(self.counters.stale_trained_max, max(a for *_, a in fresh))
                stats = self.roles.train_groups(it, [ref for _, ref, _ in fresh])
                self.version = stats[0]["version"]
                self.broadcast()
            else:
                stats = []
            self._log_update(
                "on_policy", it, stats, [s for s, _, _ in fresh], [a for *_, a in fresh], dropped=len(stale), bar=bar
            )
            self.checkpoint("on_policy", it)

    def merge(self, base: Scores) -> dict:
        """Sweep the merge scale, choose by the dual-improvement rule (learner/merge.py). When no
        scale passes, run.merge_scale is used and the summary says the rule failed."""
        sweep = {}
        for scale in self.config.run.merge_scales:
            sweep[scale], _ = self.evaluate("merged", scale)
        chosen = pick_merge_scale(base, sweep)
        # The sweep always includes dW_semi; the on-policy adapter alone is the paper's other row.
        on_policy, _ = self.evaluate(adapters.ON_POLICY)
        scale = chosen if chosen is not None else self.config.run.merge_scale
        if chosen is None:
            log.warning(
                "no merge scale passes the dual-improvement rule (in-domain and out-of-domain both up); "
                "using run.merge_scale = %g",
                scale,
            )
        unresolved = unresolved_margins(base, sweep[scale]) if scale in sweep else []
        return {
            "merge_scale": scale,
            "dual_improvement_passed": chosen is not None,
            "within_two_stderr": unresolved,
            "sweep": {str(s): v.as_row() for s, v in sweep.items()},
            "on_policy_alone": on_policy.as_row(),
        }

    def _log_update(
        self,
        phase: str,
        it: int,
        stats: list[dict],
        summaries: list[GroupSummary],
        ages: list[int] | None = None,
        dropped: int = 0,
        bar=None,
    ):
        record = {
            "phase": phase,
            "iteration": it,
            "version": self.version,
            "groups": len(summaries),
            "job_ids": [s.job_id for s in summaries],
            "dropped_stale": dropped,
            "workers": len(self.roles.live_rollout_workers()),
        }
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
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("reward_mean", "loss", "clip_fraction") if k in record})

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
        for role, ratio in self.roles.busy_ratios(time.perf_counter() - self.started).items():
            m.busy_ratio.labels(role).set(ratio)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _counter_state(c: Counters) -> dict:
    return {key: getattr(c, key) for key in CHECKPOINTED_COUNTERS}


def _describe(exc: Exception) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [x for x in str(cause).strip().splitlines() if x.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:300]


def surviving_rows(rows: list[dict]) -> list[dict]:
    """metrics.jsonl's records without those a learner restore rolled back: a `restore` record names
    where the schedule went back to (`completed`, `at`), and the records of updates (and reference
    groups) after that point, written before it, belong to weights that were thrown away; the redone
    iterations' records follow it. What is left trains each group once. (A `resume` record does not
    say where it went back to; records a crashed attempt wrote after its last checkpoint stay.)"""
    kept: list[dict] = []
    for row in rows:
        if row.get("phase") == "restore" and "completed" in row:
            completed, at = row["completed"], row.get("at") or {}
            kept = [r for r in kept if not _rolled_back(r, completed, at)]
        kept.append(row)
    return kept


def _rolled_back(row: dict, completed: list[str], at: dict) -> bool:
    phase = row.get("phase")
    if phase not in UPDATE_PHASES or phase in completed:
        return False
    return phase != at.get("phase") or row.get("iteration", 0) >= at.get("iteration", 0)
