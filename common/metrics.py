"""Prometheus metrics of a run, served over HTTP by the driver on `metrics.host:metrics.port`.

Every role's figures reach the driver anyway (group summaries, learner stats, reward-server stats,
weight versions, Redis counters), so one exporter on the driver serves them all, labelled by role
and actor: in the embedded default everything is on one loopback port, and on a cluster one scrape
target per job. The names are a contract (docs/operations.md, "Metrics"); nothing secret is ever a label.
"""

from __future__ import annotations

import logging
import socket

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (what each role reports in its stats)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class RunMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.rollout_groups = Counter("arcopo_rollout_groups", "forked groups produced", ["phase"], registry=r)
        self.rollout_seconds = Histogram(
            "arcopo_rollout_seconds", "rollout time of one group (fork + decode)", buckets=_SECONDS, registry=r
        )
        self.reward = Gauge("arcopo_reward", "mean reward of the last batch, per component", ["component"], registry=r)
        self.reward_failures = Counter("arcopo_reward_failures", "groups dropped because a reward failed", registry=r)
        self.reward_seconds = Histogram(
            "arcopo_reward_seconds", "reward-server time of one group", buckets=_SECONDS, registry=r
        )
        self.learner_step_seconds = Histogram(
            "arcopo_learner_step_seconds",
            "one AR-CoPO update (all inner steps)",
            ["adapter"],
            buckets=_SECONDS,
            registry=r,
        )
        self.loss = Gauge("arcopo_loss", "AR-CoPO loss of the last update", ["adapter"], registry=r)
        self.clip_fraction = Gauge(
            "arcopo_clip_fraction", "share of ratios clipped in the last update", ["adapter"], registry=r
        )
        self.weight_version = Gauge("arcopo_weight_version", "weight version held", ["role", "actor"], registry=r)
        self.weight_sync_seconds = Histogram(
            "arcopo_weight_sync_seconds", "publish + delivery to every worker", buckets=_SECONDS, registry=r
        )
        self.weight_sync_bytes = Gauge("arcopo_weight_sync_bytes", "bytes of the last weight packet", registry=r)
        self.staleness = Histogram(
            "arcopo_staleness",
            "weight versions between a group's policy and the learner's",
            buckets=(0, 1, 2, 3, 4, 8, 16),
            registry=r,
        )
        self.dropped_stale = Counter(
            "arcopo_dropped_stale", "groups dropped as older than learner.max_staleness", registry=r
        )
        self.replay_size = Gauge("arcopo_replay_size", "items in the replay buffer", registry=r)
        self.replay_inserts = Gauge("arcopo_replay_inserts_total", "items ever inserted (Redis counter)", registry=r)
        self.replay_samples = Gauge("arcopo_replay_samples_total", "items ever sampled (Redis counter)", registry=r)
        self.queue_depth = Gauge("arcopo_queue_depth", "jobs waiting, per queue", ["queue"], registry=r)
        self.busy_ratio = Gauge("arcopo_role_busy_ratio", "share of wall time a role works", ["role"], registry=r)
        self.rollout_workers = Gauge("arcopo_rollout_workers", "live rollout workers", registry=r)
        self.iteration = Gauge("arcopo_iteration", "current iteration", ["phase"], registry=r)
        self.server = None
        self.port = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter; port 0 picks a free one. Returns the port."""
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"metrics.port {port} on {host} is not free ({exc}); set metrics.port=0 for any") from None
        self.port = port
        log.info("metrics: http://%s:%d/metrics", host, port)
        return port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def restore_counters(self, counts: dict) -> None:
        """After a resume, counters continue from where they were instead of restarting at zero."""
        for phase, n in counts.get("rollout_groups", {}).items():
            self.rollout_groups.labels(phase).inc(n)
        self.reward_failures.inc(counts.get("reward_failures", 0))
        self.dropped_stale.inc(counts.get("dropped_stale", 0))
