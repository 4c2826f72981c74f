"""The toy job through the real front door: `ray start --head`, then `ray job submit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.net import free_port

pytestmark = pytest.mark.cluster  # `ray start --head`, then `ray job submit`

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture()
def ray_head(tmp_path):
    env = dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
    )
    gcs, dash = free_port(), free_port()
    temp = Path("/tmp") / f"ray_t{os.getpid()}"  # Ray's socket paths must stay short
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={gcs}",
        "--num-cpus=4",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield env, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
    finally:
        # `ray stop` would stop every Ray on the machine: stop only this head's processes, found by
        # the temp dir in their command lines; SIGKILL, since gcs_server can outlive a SIGTERM.
        for _ in range(20):
            if subprocess.run(["pkill", "-9", "-f", str(temp)], capture_output=True).returncode == 1:
                break  # nothing left
            time.sleep(0.5)
        # `ray start` records its head in /tmp/ray/ray_current_cluster, where a later ray.init() without
        # an address would look for it: forget it, if it is still this head's.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip() == f"127.0.0.1:{gcs}":
            current.unlink(missing_ok=True)


def test_toy_job_runs_through_ray_job_submit(ray_head, tmp_path):
    env, dashboard, _ = ray_head
    out = tmp_path / "runs"
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={dashboard}",
        "--working-dir",
        str(ROOT),
        "--",
        sys.executable,
        "-m",
        "cluster.train",
        "--config",
        "configs/toy.yaml",
        "run.name=submitted",
        "metrics.port=0",
        f"run.output_dir={out}",
        "run.phases=[on_policy]",
        "run.iterations=2",
        "rollout.prompts_per_iteration=1",
        "run.eval_prompts=2",
        "run.eval_seeds=1",
        "run.sample_prompts=1",
        "algorithm.group_size=4",
        "algorithm.num_anchors=2",
        "rollout.num_cpus_per_worker=0.5",
        "rewards.num_cpus_per_server=0.5",
        "learner.num_cpus_per_worker=0.5",
    ]
    for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stderr + proc.stdout:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout.lower()
    summary = json.loads((out / "submitted" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["groups"] == 2
    assert summary["worker_weight_versions"] == [2]
