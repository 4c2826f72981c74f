"""The job's metrics: the exporter's exposition as `promtool check metrics` reads it, the `run` label on
every series, the Grafana dashboard's queries, a toy run scraped by a real Prometheus server (Debian's
package) through the port and labels the KubeRay manifests use and read back through its HTTP API,
and Ray's own metrics pipeline measured against the exporter (docs/deploy.md, "How Prometheus finds
the job")."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from common.config import MetricsConfig, load_config
from common.metrics import RunMetrics
from common.net import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/arcopo-dashboard.json"
PODMONITOR = ROOT / "deploy/kuberay/podmonitor.yaml"
RAYJOB = ROOT / "deploy/kuberay/rayjob.yaml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "Debian's promtool (package prometheus) is not installed: `make install` installs it where apt-get can"
CONTRACT = [
    "arcopo_rollout_groups_total",
    "arcopo_rollout_seconds_bucket",
    "arcopo_reward",
    "arcopo_reward_failures_total",
    "arcopo_reward_seconds_bucket",
    "arcopo_learner_step_seconds_bucket",
    "arcopo_loss",
    "arcopo_clip_fraction",
    "arcopo_weight_version",
    "arcopo_weight_sync_seconds_bucket",
    "arcopo_weight_sync_bytes",
    "arcopo_staleness_bucket",
    "arcopo_dropped_stale_total",
    "arcopo_replay_size",
    "arcopo_replay_inserts_total",
    "arcopo_replay_samples_total",
    "arcopo_queue_depth",
    "arcopo_role_busy_ratio",
    "arcopo_rollout_workers",
    "arcopo_rollout_workers_starting",
]


def populated(run: str) -> RunMetrics:
    """Every metric of the exporter with a value, as in the middle of a run."""
    m = RunMetrics(run)
    m.rollout_groups.labels("on_policy").inc(3)
    m.rollout_seconds.observe(1.5)
    m.reward.labels("vq").set(0.9)
    m.reward_failures.inc()
    m.reward_seconds.observe(0.2)
    m.learner_step_seconds.labels("on_policy").observe(2.0)
    m.loss.labels("on_policy").set(0.1)
    m.clip_fraction.labels("on_policy").set(0.05)
    m.weight_version.labels("rollout", "rollout-0").set(4)
    m.weight_sync_seconds.observe(0.3)
    m.weight_sync_bytes.set(1 << 20)
    m.staleness.observe(1)
    m.dropped_stale.inc()
    m.replay_size.set(7)
    m.replay_inserts.set(9)
    m.replay_samples.set(5)
    m.queue_depth.labels("pending").set(2)
    m.busy_ratio.labels("rollout").set(0.8)
    m.rollout_workers.set(1)
    m.rollout_workers_starting.set(1)
    m.iteration.labels("on_policy").set(3)
    return m


def scrape(m: RunMetrics) -> str:
    """/metrics of `m`'s exporter, over HTTP, as Prometheus fetches it."""
    port = m.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read().decode()
    finally:
        m.close()


def exported_names() -> set[str]:
    """Every sample name the exporter serves (counters' _total, histograms' _bucket/_count/_sum, ...)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name for f in text_string_to_metric_families(scrape(populated("names"))) for s in f.samples}


# == the exporter ======================================================================================


def test_a_real_scrape_passes_promtool_check_metrics():
    if PROMTOOL is None:
        pytest.skip(NO_PROMTOOL)
    text = scrape(populated("promtool"))
    assert "arcopo_replay_inserts_total" in text and "arcopo_rollout_groups_total" in text
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    # promtool prints one line per problem (e.g. a gauge named *_total) and exits non-zero.
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr
    # Redis's counters are counters (rate() over them is right), not gauges.
    assert "# TYPE arcopo_replay_inserts_total counter" in text and "# TYPE arcopo_replay_samples_total counter" in text


def test_every_series_carries_its_run_label_and_two_runs_stay_apart():
    from prometheus_client.parser import text_string_to_metric_families

    series = {}
    for run in ("run-a", "run-b"):
        families = list(text_string_to_metric_families(scrape(populated(run))))
        samples = [s for f in families for s in f.samples]
        assert samples and all(s.labels.get("run") == run for s in samples), [
            s for s in samples if s.labels.get("run") != run
        ][:3]
        assert set(CONTRACT) <= {s.name for s in samples}
        series[run] = {(s.name, tuple(sorted(s.labels.items()))) for s in samples}
    assert not series["run-a"] & series["run-b"]  # one Prometheus, two runs: no series shared
    with pytest.raises(ValueError, match="run.name"):
        RunMetrics("")


def test_the_default_port_is_none_of_rays_and_binds_loopback():
    from deploy.validate import _head_port_conflicts

    default = MetricsConfig()
    # KubeRay starts every Ray node with --metrics-export-port=8080: the driver on the head could not bind it.
    assert default.port != 8080 and _head_port_conflicts(None, default.port) == []
    assert default.host == "127.0.0.1"  # 0.0.0.0 only where configured (the KubeRay manifests)


def test_mirrored_counters_export_nothing_before_the_first_value():
    text = scrape(RunMetrics("fresh"))
    assert "arcopo_replay_inserts_total{" not in text and "arcopo_rollout_seconds_count{" in text


# == the Grafana dashboard =============================================================================

SELECTOR = re.compile(r"\b(arcopo_[a-z_]+)(\{[^}]*\})?")


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_every_dashboard_query_filters_by_run_and_names_only_exported_metrics():
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    run = variables["run"]
    assert run["type"] == "query" and run["multi"] and run["includeAll"]
    names = exported_names()
    match = re.match(r"^label_values\((\w+), run\)$", run["query"]["query"])
    assert match and match.group(1) in names, run["query"]
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        selectors = SELECTOR.findall(expr)
        assert selectors, expr
        for name, matchers in selectors:
            assert name in names, f"{expr}: {name} is not a metric the exporter serves"
            assert 'run=~"$run"' in matchers, f"{expr}: {name} is not filtered by the run variable"
        if "sum by" in expr:
            assert re.search(r"sum by \(run\b", expr), f"{expr}: sums two runs together"
    if PROMTOOL is None:
        pytest.skip(NO_PROMTOOL + " (checks the queries' PromQL syntax)")
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, expr in enumerate(exprs):
        rules["groups"][0]["rules"].append({"record": f"dashboard:query_{i}", "expr": expr.replace("$run", ".*")})
    proc = subprocess.run(
        [PROMTOOL, "check", "rules", "/dev/stdin"], input=yaml.safe_dump(rules), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# == a real Prometheus, scraping a toy run as the KubeRay PodMonitor would =============================


def _query(port: int, expr: str, at: float | None = None) -> list:
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _outside_address() -> str:
    """This machine's address on its network (not loopback), where a 0.0.0.0 exporter is reachable
    the way a pod's is from Prometheus; loopback if the machine has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.255", 9))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def kubernetes_pod_targets(doc: dict, namespace: str, address: str, metrics_port: int) -> list[dict]:
    """What Prometheus's Kubernetes pod discovery would list for the RayJob's pods: one target per
    container port of the head (with the labels KubeRay gives the head pod) and one port-less target
    per worker pod, with the __meta_kubernetes_* labels. The metrics port's number is `metrics_port`
    (a free one here; the PodMonitor matches the port by name)."""
    from deploy.validate import KUBERAY_POD_LABELS, head_pod_labels

    spec = doc["spec"]["rayClusterSpec"]
    head_labels = {**head_pod_labels(doc), "ray.io/cluster": f"{doc['metadata']['name']}-x7k2p"}
    pods = [("head", spec["headGroupSpec"], head_labels)]
    for g in spec["workerGroupSpecs"]:
        labels = {**KUBERAY_POD_LABELS, **g["template"]["metadata"]["labels"]}
        labels.update({"ray.io/node-type": "worker", "ray.io/group": g["groupName"], "ray.io/cluster": "x"})
        pods.append((g["groupName"], g, labels))
    targets = []
    for name, group, labels in pods:
        container = group["template"]["spec"]["containers"][0]
        meta = {
            "__meta_kubernetes_namespace": namespace,
            "__meta_kubernetes_pod_name": f"arcopo-{name}-0",
            "__meta_kubernetes_pod_container_name": container["name"],
        }
        for key, value in labels.items():
            meta[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
            meta[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
        for port in container.get("ports") or [None]:
            number = None if port is None else port["containerPort"]
            if port is not None and port.get("name") == "arcopo-metrics":
                number = metrics_port
            labels_here = dict(meta)
            if port is not None:
                labels_here["__meta_kubernetes_pod_container_port_name"] = port.get("name", "")
                labels_here["__meta_kubernetes_pod_container_port_number"] = str(number)
            host = "192.0.2.254" if name != "head" else address  # nothing listens there: never scraped
            targets.append({"targets": [host if number is None else f"{host}:{number}"], "labels": labels_here})
    return targets


def podmonitor_scrape_config(monitor: dict, namespace: str, targets: list[dict]) -> dict:
    """The scrape job the Prometheus Operator generates for the PodMonitor's first endpoint (its
    selector as `keep` rules, the port by name, then namespace/pod/container/endpoint/job), with the
    pod discovery replaced by `targets`."""
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert not monitor["spec"]["selector"].get("matchExpressions")
    relabel = [{"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}]
    for key, value in sorted(monitor["spec"]["selector"]["matchLabels"].items()):
        relabel.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_pod_label_{_sanitize(key)}",
                    f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}",
                ],
                "regex": f"({re.escape(value)});true",
            }
        )
    relabel += [
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": endpoint["port"]},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{namespace}/{monitor['metadata']['name']}"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    return {
        "job_name": f"podMonitor/{namespace}/{monitor['metadata']['name']}/0",
        "metrics_path": endpoint.get("path", "/metrics"),
        "scheme": endpoint.get("scheme", "http"),
        "scrape_interval": "1s",  # the PodMonitor's 15s, shortened for the test
        "static_configs": targets,
        "relabel_configs": relabel,
    }


@pytest.fixture()
def prometheus(tmp_path):
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus is not installed (make install installs it where apt-get can)")
    target, web = free_port(), free_port()
    address = _outside_address()
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"] = [c for c in config["scrape_configs"] if c["job_name"] == "arcopo"]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{target}"]
    monitor, rayjob = yaml.safe_load(PODMONITOR.read_text()), yaml.safe_load(RAYJOB.read_text())
    pods = kubernetes_pod_targets(rayjob, "arcopo", address, target)
    config["scrape_configs"].append(podmonitor_scrape_config(monitor, "arcopo", pods))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "wb"),
    )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{web}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        yield target, web, address
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.cluster  # a toy run on local Ray, scraped by a real Prometheus
def test_prometheus_scrapes_a_toy_run_through_the_podmonitor_and_the_dashboard_reads_it(prometheus, tmp_path):
    pytest.importorskip("ray")
    from cluster.local import ray_env_defaults
    from cluster.train import RunFolder, run
    from deploy.validate import load_entrypoint_config

    target, web, address = prometheus
    manifest = load_entrypoint_config(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"]).metrics
    name = f"m{uuid.uuid4().hex[:8]}"
    cfg = load_config(
        "configs/toy.yaml",
        [
            f"metrics.host={manifest.host}",  # 0.0.0.0, as on the head pod
            f"metrics.port={target}",
            f"run.name={name}",
            f"run.output_dir={tmp_path}",
            f"cluster.namespace={name}",
            "run.phases=[reference,semi,on_policy]",
            "run.iterations=4",
            "run.semi_iterations=2",
            "rollout.prompts_per_iteration=1",
            "replay.num_reference_groups=2",
            "run.eval_prompts=1",
            "run.eval_seeds=1",
            "run.sample_prompts=0",
            "algorithm.group_size=4",
            "algorithm.num_anchors=2",
            "cluster.num_cpus=4",
        ],
    )
    ray_env_defaults()
    # Slow the run's end down just enough that the 1 s scrape sees the final values.
    summary = run(cfg, RunFolder(tmp_path / name), linger_s=3.0)
    # The exporter is gone now, so Prometheus has marked the series stale: read them over a window.
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/label/__name__/values", timeout=10) as r:
        names = set(json.load(r)["data"])
    missing = [m for m in CONTRACT if m not in names]
    assert not missing, missing

    def last(expr: str) -> float:
        return float(_query(web, f"max(max_over_time({expr}[10m]))")[0]["value"][1])

    assert last(f'arcopo_weight_version{{role="rollout",run="{name}"}}') == summary["weight_version"] == 2 + 4
    assert last(f'arcopo_rollout_groups_total{{phase="on_policy",run="{name}"}}') == 4
    assert last(f'arcopo_rollout_groups_total{{phase="reference",run="{name}"}}') == 2
    assert last(f'arcopo_replay_inserts_total{{run="{name}"}}') == 2
    assert last(f'arcopo_replay_samples_total{{run="{name}"}}') == 2
    assert last(f'arcopo_rollout_workers{{run="{name}"}}') == 1

    # The PodMonitor's job: of every container port of the RayJob's pods, only the head's port named
    # as the PodMonitor says was scraped, at this machine's address (the exporter bound 0.0.0.0).
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/targets?state=any", timeout=10) as r:
        targets = json.load(r)["data"]
    pod_job = "arcopo/" + yaml.safe_load(PODMONITOR.read_text())["metadata"]["name"]
    active = [t for t in targets["activeTargets"] if t["labels"]["job"] == pod_job]
    assert [t["labels"]["endpoint"] for t in active] == ["arcopo-metrics"], active
    assert active[0]["scrapeUrl"] == f"http://{address}:{target}/metrics"
    dropped = [t for t in targets["droppedTargets"] if "__meta_kubernetes_pod_name" in t["discoveredLabels"]]
    assert len(dropped) == len(kubernetes_pod_targets(yaml.safe_load(RAYJOB.read_text()), "arcopo", address, 0)) - 1
    scraped = _query(web, f'max_over_time(arcopo_weight_version{{job="{pod_job}",role="rollout"}}[10m])')
    assert scraped and all(s["metric"]["run"] == name for s in scraped), scraped
    assert {s["metric"]["pod"] for s in scraped} == {"arcopo-head-0"} and scraped[0]["metric"]["namespace"] == "arcopo"

    # Every dashboard query, for this run, at the last scrape: each returns this run's series, and only them.
    raw = _query(web, f'arcopo_rollout_workers{{run="{name}",job="arcopo"}}[10m]')
    at = max(float(t) for t, _ in raw[0]["values"])
    for expr in dashboard_exprs():
        result = _query(web, expr.replace("$run", re.escape(name)), at=at)
        assert result and all(s["metric"].get("run") == name for s in result), (expr, result)
    # Nothing secret in any label.
    with urllib.request.urlopen(
        f"http://127.0.0.1:{web}/api/v1/series?match[]=" + urllib.parse.quote('{__name__=~"arcopo_.*"}'), timeout=10
    ) as r:
        text = r.read().decode()
    assert "password" not in text.lower() and "redis://" not in text


# == Ray's own metrics pipeline, measured (the decision in docs/deploy.md) ==============================

RAY_PROBE = textwrap.dedent(
    """
    import json, sys, time, urllib.request
    import ray
    from ray.util.metrics import Gauge

    # address="local": never join a cluster another test or session left behind (/tmp/ray/ray_current_cluster)
    ray.init(address="local", num_cpus=1, include_dashboard=False, _metrics_export_port=int(sys.argv[1]))
    gauge = Gauge("arcopo_probe", description="set once by the driver", tag_keys=("run",))
    gauge.set(42.0, tags={"run": "probe"})
    start, seen = time.monotonic(), None
    while time.monotonic() - start < 60 and seen is None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read().decode()
        except OSError:
            text = ""
        lines = [l for l in text.splitlines() if "arcopo_probe{" in l]
        if lines:
            seen = time.monotonic() - start
        else:
            time.sleep(0.1)
    # The driver's exporter on the port Ray's metrics agent holds (KubeRay: 8080 on every node).
    from common.metrics import RunMetrics
    try:
        RunMetrics("probe").serve("127.0.0.1", int(sys.argv[1]))
        clash = None
    except OSError as exc:
        clash = str(exc)
    print(json.dumps({"seconds": seen, "lines": lines, "clash": clash}))
    ray.shutdown()
    """
)


@pytest.mark.cluster  # starts a local Ray
def test_rays_own_pipeline_delays_renames_and_relabels_a_driver_gauge():
    """What docs/deploy.md's choice of the driver's own exporter rests on: a ray.util.metrics gauge set
    by the driver reaches the node's metrics endpoint only after Ray's report interval, renamed ray_*,
    and labelled per process (WorkerId, SessionName, ...), so a resumed driver starts new series; the
    exporter serves a value the moment it is set. And why metrics.port must not be Ray's metrics port
    (8080 under KubeRay): the exporter cannot bind a port Ray's agent holds."""
    pytest.importorskip("ray")
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-c", RAY_PROBE, str(port)], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["seconds"] is not None, "the driver's gauge never reached Ray's metrics endpoint in 60 s"
    (sample,) = [s for f in text_string_to_metric_families("\n".join(result["lines"]) + "\n") for s in f.samples]
    print(f"\nray.util.metrics: visible after {result['seconds']:.1f} s as {sample.name} {sorted(sample.labels)}")
    assert sample.name == "ray_arcopo_probe" and sample.value == 42.0
    assert {"WorkerId", "SessionName", "run"} <= set(sample.labels)
    # Ray's metrics agent holds its port: an exporter asked to share it stops the job at start.
    assert result["clash"] and "is not free" in result["clash"], result["clash"]
    # The driver's exporter: the value is there on the first scrape after set().
    m = RunMetrics("probe")
    m.rollout_workers.set(42)
    assert 'arcopo_rollout_workers{run="probe"} 42.0' in scrape(m)
