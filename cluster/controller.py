"""The run's controller actor and its counters.

`Controller` is a tiny named actor (`controller`) that outlives no job: `python -m cluster.scale`
sets the rollout worker target on it and the rollout pool polls it between jobs. `Counters` are the
run's tallies (groups, failures, weight syncs, staleness), shared by the rollout pool, the roles'
weight broadcast and the driver, saved in every checkpoint and reported in summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # Learner groups the driver replaced (and restored from the newest complete checkpoint) in this
    # job; bounded by run.max_learner_restarts.
    learner_restarts: int = 0
    # One entry per weight broadcast after an update: {"version", "bytes", "seconds"}, and with the
    # collective transport {"attempts", "lost"} (broadcasts tried, rollout workers dropped mid-sync).
    weight_sync_log: list[dict] = field(default_factory=list)
    # Collective transport: rollout workers that died (or hung) during a weight sync and were dropped
    # from it (also counted in worker_failures), and broadcasts repeated over a re-formed group.
    weight_sync_workers_lost: int = 0
    weight_sync_retries: int = 0


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
