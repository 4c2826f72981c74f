"""The job's metrics, scraped by a real Prometheus server (Debian's package) and read back through
its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from common.config import load_config
from common.net import free_port

ROOT = Path(__file__).resolve().parent.parent
ray = pytest.importorskip("ray")
pytestmark = pytest.mark.cluster  # a toy run on local Ray, scraped by a real Prometheus
PROMETHEUS = shutil.which("prometheus")
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
]


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture()
def prometheus(tmp_path):
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus is not installed (make install installs it where apt-get can)")
    target, web = free_port(), free_port()
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"] = [c for c in config["scrape_configs"] if c["job_name"] == "arcopo"]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{target}"]
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
        yield target, web
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prometheus_scrapes_every_contract_metric_of_a_toy_run(prometheus, tmp_path):
    from cluster.local import ray_env_defaults
    from cluster.train import RunFolder, run

    target, web = prometheus
    name = f"m{uuid.uuid4().hex[:8]}"
    cfg = load_config(
        "configs/toy.yaml",
        [
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

    assert last('arcopo_weight_version{role="rollout"}') == summary["weight_version"] == 2 + 4
    assert last('arcopo_rollout_groups_total{phase="on_policy"}') == 4
    assert last('arcopo_rollout_groups_total{phase="reference"}') == 2
    assert last("arcopo_replay_inserts_total") == 2 and last("arcopo_replay_samples_total") == 2
    assert last("arcopo_rollout_workers") == 1
    # Nothing secret in any label.
    with urllib.request.urlopen(
        f"http://127.0.0.1:{web}/api/v1/series?match[]=" + urllib.parse.quote('{__name__=~"arcopo_.*"}'), timeout=10
    ) as r:
        text = r.read().decode()
    assert "password" not in text.lower() and "redis://" not in text
