"""Prometheus metrics of a run, served over HTTP by the driver on `metrics.host:metrics.port`.

Every role's figures reach the driver anyway (group summaries, learner stats, reward-server stats,
weight versions, Redis counters), so one exporter on the driver serves them all, labelled by role
and actor: in the embedded default everything is on one loopback port, and on a cluster one scrape
target per job (docs/deploy.md, "How Prometheus finds the job"). Every series carries the label
`run` (run.name), so that two runs scraped by one Prometheus stay apart. The names are a contract
(docs/operations.md, "Metrics"); nothing secret is ever a label.

The default port (metrics.port, 9464) is not 8080, which KubeRay gives every Ray node as
`--metrics-export-port`: the driver on the head could never bind that one (docs/deploy.md).
"""

from __future__ import annotations

import logging
import socket

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (what each role reports in its stats)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class MirroredCounter:
    """A counter kept elsewhere (the replay buffer's Redis HINCRBY stats), exported as a Prometheus
    counter `<name>_total` with the value it has there: `set(value)` records that value (it only
    grows, and a new Redis starts it at zero, which Prometheus reads as a counter reset). Nothing is
    exported before the first `set`."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self.value = float(value)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[Metric]:
        if self.value is None:
            return []
        return [CounterMetricFamily(self.name, self.documentation, value=self.value)]


class _Labelled:
    """Every family of `inner` with `labels` added to each of its samples (Prometheus's Python client
    has no constant labels): the registry the exporter serves."""

    def __init__(self, inner: CollectorRegistry, labels: dict[str, str]):
        self.inner, self.labels = inner, labels

    def describe(self) -> list[Metric]:
        return []  # names are checked for duplicates in `inner`

    def collect(self):
        for family in self.inner.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**s.labels, **self.labels}) for s in family.samples]
            yield out


class RunMetrics:
    """The run's metrics. `run` (run.name) is the value of the `run` label on every series."""

    def __init__(self, run: str):
        if not isinstance(run, str) or not run:
            raise ValueError(f"RunMetrics needs the run's name (run.name) for its `run` label, got {run!r}")
        self.run = run
        r = self.own = CollectorRegistry()  # the metrics themselves, unlabelled by run
        self.registry = CollectorRegistry()  # what the exporter serves: `own` with run="<run.name>"
        self.registry.register(_Labelled(self.own, {"run": run}))
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
        # Redis's own counters, exported as counters (arcopo_replay_{inserts,samples}_total).
        self.replay_inserts = MirroredCounter("arcopo_replay_inserts", "items ever inserted (Redis counter)", r)
        self.replay_samples = MirroredCounter("arcopo_replay_samples", "items ever sampled (Redis counter)", r)
        self.queue_depth = Gauge("arcopo_queue_depth", "jobs waiting, per queue", ["queue"], registry=r)
        self.busy_ratio = Gauge("arcopo_role_busy_ratio", "share of wall time a role works", ["role"], registry=r)
        self.rollout_workers = Gauge("arcopo_rollout_workers", "live rollout workers", registry=r)
        self.rollout_workers_starting = Gauge(
            "arcopo_rollout_workers_starting",
            "rollout workers started but not up yet (a replacement waiting for a node, or building)",
            registry=r,
        )
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
