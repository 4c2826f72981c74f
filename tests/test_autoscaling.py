"""A job on a cluster that does not have its roles' resources yet (cluster/placement.py:
wait_for_resources), on a real local multi-node Ray (`ray.cluster_utils.Cluster`, a head of 1 CPU;
the small toy job needs 1.5): on a fixed cluster it is refused at once, as always; on an autoscaling
one it asks for them, says what is missing while it waits, and starts when a node with them joins,
or is refused after cluster.resource_wait_s with the same message plus the wait."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import pytest

from cluster.local import ray_env_defaults
from common.config import load_config
from tests.helpers import SMALL_TOY_JOB

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.cluster  # local multi-node Ray and an embedded redis-server

TOY = "configs/toy.yaml"
# tests/test_cluster.py's small toy job, one on-policy iteration: 0.5 CPU each for a rollout worker,
# a reward server and a learner, 1.5 in all.
SMALL = [*SMALL_TOY_JOB, "run.phases=[on_policy]", "run.iterations=1"]


@pytest.fixture(scope="module")
def head_only():
    """A cluster of one node, the head, with 1 CPU; yields the `Cluster` (tests add nodes to it)."""
    from ray._common.utils import get_ray_address_file
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_env_defaults()
    # Cluster writes this machine's "current cluster" address file and shutdown() deletes it; other
    # Ray clusters run here, so whatever was there is put back.
    address_file = Path(get_ray_address_file(None))
    saved = address_file.read_text() if address_file.exists() else None
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import: without this, ray.init turns the
    # head's 127.0.0.1 into this machine's address, where the head (bound to loopback) is not.
    patch = pytest.MonkeyPatch()
    patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        patch.undo()
        if saved is not None:
            address_file.parent.mkdir(parents=True, exist_ok=True)
            address_file.write_text(saved)


def config(tmp_path: Path, *overrides: str):
    name = f"t{uuid.uuid4().hex[:8]}"
    return load_config(
        TOY, [*SMALL, f"run.name={name}", f"run.output_dir={tmp_path}", f"cluster.namespace={name}", *overrides]
    )


def asked() -> list:
    """What the job asked the (v1) autoscaler for (ray.autoscaler.sdk.request_resources)."""
    import json

    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental import internal_kv

    return json.loads(internal_kv._internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"null")


REFUSAL = r"the roles need 1\.5 CPU \(rollout 1 x 0\.5, rewards 1 x 0\.5, learner 1 x 0\.5\) but the cluster has 1"


@pytest.mark.parametrize("autoscaling", ["false", "auto"])
def test_a_fixed_cluster_refuses_at_once(head_only, tmp_path, autoscaling):
    """autoscaling off, or `auto` on a cluster no autoscaler runs (this one): refused at once, with
    check_resources' message, however long cluster.resource_wait_s is."""
    from cluster.placement import PlacementError, cluster_autoscales, wait_for_resources

    assert not cluster_autoscales()
    cfg = config(tmp_path, f"cluster.autoscaling={autoscaling}", "cluster.resource_wait_s=600")
    start = time.monotonic()
    with pytest.raises(PlacementError, match=REFUSAL) as refused:
        wait_for_resources(cfg)
    assert time.monotonic() - start < 5
    assert "waited" not in str(refused.value)


def test_an_autoscaling_cluster_refuses_after_the_wait(head_only, tmp_path, caplog):
    from cluster.placement import PlacementError, wait_for_resources

    caplog.set_level(logging.INFO, logger="cluster.placement")
    cfg = config(tmp_path, "cluster.autoscaling=true", "cluster.resource_wait_s=3")
    start = time.monotonic()
    with pytest.raises(
        PlacementError, match=REFUSAL + r".*\(waited \d+ s, cluster\.resource_wait_s, .* to add 0\.5 CPU\)"
    ):
        wait_for_resources(cfg, report_s=1.0)
    assert 3 <= time.monotonic() - start < 15
    assert asked() == []  # the request to the autoscaler is withdrawn with the job
    progress = [r.getMessage() for r in caplog.records if "waiting for the autoscaler" in r.getMessage()]
    assert len(progress) >= 2, progress  # one at once, then every report_s
    assert (
        progress[0] == "waiting for the autoscaler: the roles miss 0.5 CPU; waited 0 of 3 s (cluster.resource_wait_s)"
    )


def test_an_autoscaling_cluster_starts_the_job_once_a_node_with_the_resources_joins(head_only, tmp_path, caplog):
    """The whole job: it waits (saying what is missing) until a node with 1 CPU joins 5 s later,
    then places its roles and runs to the end. (The job runs in a thread: Ray starts a node only
    from the main thread.)"""
    from cluster.train import RunFolder, run

    caplog.set_level(logging.INFO, logger="cluster.placement")
    cfg = config(tmp_path, "cluster.autoscaling=true", "cluster.resource_wait_s=120")
    out: dict = {}

    def job():
        try:
            out["summary"] = run(cfg, RunFolder(tmp_path / cfg.run.name))
        except Exception as exc:  # noqa: BLE001 - asserted below
            out["error"] = exc

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    time.sleep(5)
    assert thread.is_alive() and not out, out  # still waiting for resources
    # Nothing is pending yet that would make an autoscaler scale: the job asked for its roles' bundles.
    assert asked() == [{"CPU": 0.5}] * 3
    node = head_only.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    thread.join(timeout=400)
    head_only.remove_node(node)
    assert "error" not in out, out["error"]
    assert asked() == []  # and withdrew the request once it had them
    messages = [r.getMessage() for r in caplog.records if r.name == "cluster.placement"]
    assert any(m.startswith("waiting for the autoscaler: the roles miss 0.5 CPU; waited") for m in messages), messages
    [arrived] = [m for m in messages if m.startswith("the cluster has the roles' resources after")]
    assert float(arrived.split("after ")[1].split(" s")[0]) >= 4  # it waited for the node
    summary = out["summary"]
    assert summary["iterations"] == 1 and summary["groups"] == 2
    assert summary["worker_weight_versions"] == [1]


def test_autoscaling_is_told_from_rays_autoscaler_state(monkeypatch):
    """`auto`: a cluster config whose node groups can grow (autoscaler v2, KubeRay), or a v1
    autoscaler report naming a cluster config's node types (`ray up`), autoscales; the v1 monitor
    that every head runs, on `ray start`ed nodes (types named after node ids), and fixed groups do not."""
    import json

    import ray._private.state
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from cluster.placement import cluster_autoscales

    def v1(*types: str) -> None:
        report = {"active_nodes": {t: 1 for t in types}, "pending_launches": {}, "node_type_mapping": {}}
        status = json.dumps({"autoscaler_report": report}).encode()
        monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: None)
        monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, **_: status)

    def v2(*groups: tuple[int, int]) -> None:
        config = autoscaler_pb2.ClusterConfig(
            node_group_configs=[
                autoscaler_pb2.NodeGroupConfig(name=f"g{i}", resources={"CPU": 8}, min_count=lo, max_count=hi)
                for i, (lo, hi) in enumerate(groups)
            ]
        )
        monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: config)

    v1("node_" + "ab" * 28, "node_" + "0f" * 28)
    assert not cluster_autoscales()
    v1("ray.head.default", "rollout")
    assert cluster_autoscales()
    v2((0, 0), (1, 4))
    assert cluster_autoscales()
    v2((0, 0), (2, 2))
    assert not cluster_autoscales()
    v2((1, -1))
    assert cluster_autoscales()
