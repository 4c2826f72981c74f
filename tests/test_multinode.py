"""Several Ray nodes, simulated on this machine with Ray's own `ray.cluster_utils.Cluster`: a head and
one node per role group, each its own raylet and object store, advertising the role's custom resource
as the deploy manifests do (docs/deploy.md, "Placing roles on their own nodes"). The toy job runs on
them with `rollout/rewards/learner.resources` set: every role must land on its own group, records and
weights must cross nodes, and a rollout node removed mid-run must lose no group.

All nodes listen on 127.0.0.1, so the embedded Redis (on loopback, `replay.redis_url` unset) is
reachable from every node here; on a real cluster the nodes are other machines and the job needs a
`replay.redis_url` they can all reach."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from cluster.local import ray_env_defaults
from common.config import load_config
from common.net import free_port
from tests.helpers import SMALL_TOY_JOB

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.cluster  # several raylets, a dashboard and an embedded redis-server

TOY = "configs/toy.yaml"
# tests/test_cluster.py's SMALL.
SMALL = [
    *SMALL_TOY_JOB,
    "run.checkpoint_every=2",
    "run.iterations=3",
    "run.semi_iterations=2",
    "replay.num_reference_groups=3",
]
# One unit of its group's resource per actor, as the manifests' entrypoints ask (one per GPU there).
ROLE_RESOURCES = [
    "rollout.resources={rollout_node: 1}",
    "rewards.resources={reward_node: 1}",
    "learner.resources={learner_node: 1}",
]
# Actor name prefix -> the custom resource of the node group it must run on.
ROLE_OF_PREFIX = {"rollout-": "rollout_node", "reward-": "reward_node", "learner-": "learner_node"}
# How long the node-loss run gives a call (a rollout job, a weight sync, a learner update): a toy group
# takes under a second and an update about one on 2 busy cores. The default is 600 s; a replacement
# that cannot be placed waits outside the pool and holds no call (test_an_unplaceable_replacement_...).
NODE_LOSS_CALL_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def nodes():
    """A head with 1 CPU and no role resource (a role that ignored its `resources` could land there),
    and one node per role group with 1 CPU (room for any 0.5-CPU role) and its group's resource.
    Yields (cluster, {group resource: [node]}, dashboard address)."""
    from ray._common.utils import get_ray_address_file
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_env_defaults()  # RAY_AUTH_MODE=disabled unless set, as every local run of the project
    # Cluster writes this machine's "current cluster" address file and shutdown() deletes it; other
    # Ray clusters run here, so whatever was there is put back.
    address_file = Path(get_ray_address_file(None))
    saved = address_file.read_text() if address_file.exists() else None
    # ray_env_defaults' RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps loopback addresses as they are, but
    # Ray reads it once, at import, and this process imported Ray before: without it, ray.init turns
    # the head's 127.0.0.1 into this machine's address, where the head (bound to loopback) is not.
    patch = pytest.MonkeyPatch()
    patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster()
    try:
        dashboard_port = free_port()
        cluster.add_node(
            num_cpus=1,
            node_ip_address="127.0.0.1",
            include_dashboard=True,  # for ray.util.state.list_actors (the node of every actor, dead ones too)
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
        )
        groups = {
            resource: [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={resource: 1})]
            for resource in ("reward_node", "learner_node")
        }
        groups["rollout_node"] = [add_rollout_node(cluster)]
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        # The driver (and the embedded Redis it starts) is on the head: nothing it holds is on a role node.
        assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id
        yield cluster, groups, f"http://127.0.0.1:{dashboard_port}"
    finally:
        ray.shutdown()
        cluster.shutdown()
        patch.undo()
        if saved is not None:
            address_file.parent.mkdir(parents=True, exist_ok=True)
            address_file.write_text(saved)


def add_rollout_node(cluster):
    return cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"rollout_node": 1})


def job_overrides(tmp_path: Path, *overrides: str) -> tuple[list[str], str]:
    name = f"t{uuid.uuid4().hex[:8]}"
    return [
        *SMALL,
        *ROLE_RESOURCES,
        f"run.name={name}",
        f"run.output_dir={tmp_path}",
        f"cluster.namespace={name}",
        *overrides,
    ], name


def metrics(root: Path) -> list[dict]:
    path = root / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def actor_nodes(dashboard: str, namespace: str, *, alive: bool = False) -> dict[str, str | None]:
    """Every named actor the run started (alive or dead; only the alive ones with `alive`) -> the node it
    ran on (None: never placed, or killed before it was up)."""
    from ray.util.state import list_actors

    filters = [("ray_namespace", "=", namespace)] + ([("state", "=", "ALIVE")] if alive else [])
    actors = list_actors(address=dashboard, filters=filters, limit=1000, detail=True)
    return {a.name: a.node_id for a in actors if a.name}


def check_role_placement(placed: dict[str, str | None], groups: dict) -> None:
    for name, node_id in placed.items():
        resource = next((r for prefix, r in ROLE_OF_PREFIX.items() if name.startswith(prefix)), None)
        if resource is None or node_id is None:  # the controller (0 CPUs, anywhere); a worker never placed
            continue
        assert node_id in {n.node_id for n in groups[resource]}, (name, node_id, resource)


def test_every_role_runs_on_its_node_group_and_records_and_weights_cross_nodes(nodes, tmp_path):
    from cluster.train import RunFolder, run

    cluster, groups, dashboard = nodes
    overrides, name = job_overrides(tmp_path)
    summary = run(load_config(TOY, overrides), RunFolder(tmp_path / name))
    root = tmp_path / name

    placed = actor_nodes(dashboard, name)
    assert {"learner-0", "reward-0", "rollout-0"} <= placed.keys(), placed
    check_role_placement(placed, groups)
    # Each role on its own node, none on the head: every record and weight packet crossed nodes.
    on = {n: placed[n] for n in ("learner-0", "reward-0", "rollout-0")}
    assert len(set(on.values())) == 3 and cluster.head_node.node_id not in on.values(), on

    # Every group made (rollout node, scored on the reward node) reached the learner node: the
    # reference groups through Redis, the on-policy ones through the object store, each once.
    rows = metrics(root)
    assert [r["job_ids"] for r in rows if r["phase"] == "reference"] == [[0, 1, 2]]
    on_policy = [r for r in rows if r["phase"] == "on_policy"]
    assert [r["iteration"] for r in on_policy] == [0, 1, 2]
    assert [r["job_ids"] for r in on_policy] == [[3, 4], [5, 6], [7, 8]]
    assert [r["version"] for r in rows if r["phase"] == "semi"] == [1, 2]
    assert summary["groups"] == 3 + 3 * 2
    assert summary["reward_failures"] == 0 and summary["dropped_stale"] == 0 and summary["worker_failures"] == 0
    # The learner node's weights reached the rollout node after every update.
    assert summary["weight_version"] == 5 and summary["worker_weight_versions"] == [5]
    assert summary["weight_sync_bytes"] > 0
    assert summary["final_policy"] == "merged" and (root / "export" / "pytorch_lora_weights.safetensors").is_file()


@pytest.fixture(scope="module")
def node_loss(nodes, tmp_path_factory):
    """One on-policy run on two rollout nodes (one worker each), one of which is removed once the first
    on-policy iteration is logged. Returns what the tests below look at."""
    from cluster.train import RunFolder, run

    cluster, groups, dashboard = nodes
    tmp_path = tmp_path_factory.mktemp("node_loss")
    iterations = 3
    overrides, name = job_overrides(
        tmp_path,
        "run.phases=[on_policy]",
        f"run.iterations={iterations}",
        "rollout.num_workers=2",
        f"cluster.call_timeout_s={NODE_LOSS_CALL_TIMEOUT_S}",
    )
    root = tmp_path / name
    rollout_nodes = [*groups["rollout_node"], add_rollout_node(cluster)]
    seen: dict = {}

    def on_policy_rows_reach(count: int, deadline: float) -> bool:
        while time.time() < deadline:
            if sum(r["phase"] == "on_policy" for r in metrics(root)) >= count:
                return True
            time.sleep(0.05)
        return False

    def remove_a_rollout_node():
        deadline = time.time() + 540
        if not on_policy_rows_reach(1, deadline):
            return
        # Which worker is where, just before (a worker slow to start may have been replaced already).
        seen["before"] = actor_nodes(dashboard, name, alive=True)
        # The controller is pinned to the driver's node (test_the_controller_runs_on_the_drivers_node),
        # so the rollout node added here can go.
        doomed = rollout_nodes[-1]
        seen["removed_at"] = time.time()
        cluster.remove_node(doomed)
        seen["doomed"] = doomed
        if on_policy_rows_reach(iterations, deadline):  # who is left to roll out, once the last groups are in
            seen["after"] = actor_nodes(dashboard, name, alive=True)

    thread = threading.Thread(target=remove_a_rollout_node, daemon=True)
    thread.start()
    folder = RunFolder(root)
    try:
        summary = run(load_config(TOY, overrides), folder)
    finally:
        thread.join(timeout=60)
        # Leave the cluster as the other tests know it: one rollout node.
        left = [n for n in rollout_nodes if n in cluster.worker_nodes]
        for node in left[1:]:
            cluster.remove_node(node)
        groups["rollout_node"] = left[:1] or [add_rollout_node(cluster)]
    assert "removed_at" in seen, "the rollout node was never removed"
    [survivor] = [n for n in rollout_nodes if n is not seen["doomed"]]
    return {
        "summary": summary,
        "rows": metrics(root),
        "placed": actor_nodes(dashboard, name),
        "before": seen["before"],
        "after": seen.get("after"),
        "survivor": survivor.node_id,
        "doomed": seen["doomed"].node_id,
        "removed_at": seen["removed_at"] - folder.started,  # on the clock of metrics.jsonl's "time"
        "iterations": iterations,
        "groups": {**groups, "rollout_node": rollout_nodes},
    }


def test_a_rollout_node_removed_mid_run_loses_no_group(node_loss):
    summary, rows, n = node_loss["summary"], node_loss["rows"], node_loss["iterations"]
    on_policy = [r for r in rows if r["phase"] == "on_policy"]
    # Every on-policy iteration trained its own groups, each exactly once (ids after the 3 reference ids).
    assert [r["iteration"] for r in on_policy] == list(range(n))
    assert [r["job_ids"] for r in on_policy] == [[3 + 2 * i, 4 + 2 * i] for i in range(n)]
    assert summary["groups"] == 2 * n and summary["reward_failures"] == 0
    # Just before the removal one worker was on each rollout node; the removed node's was lost, and counted.
    before = {w: node for w, node in node_loss["before"].items() if w.startswith("rollout-")}
    assert sorted(before.values()) == sorted([node_loss["survivor"], node_loss["doomed"]]), before
    [victim] = [w for w, node in before.items() if node == node_loss["doomed"]]
    assert summary["worker_failures"] >= 1
    # Lost in a job (the job is redone) or found dead by a weight sync (its share goes elsewhere).
    assert summary["jobs_redone"] >= 1 or f"lost {victim}" in summary["scaling_events"], summary["scaling_events"]
    # No role ran off its group, replacements included.
    check_role_placement(node_loss["placed"], node_loss["groups"])
    # The rollout resource is left only on the surviving node, and the pool did not wait for another: when
    # the last iteration's groups were in, whoever rolls out is there, so the lost worker's share
    # (its job, if it died in one, and every later one) was made there.
    after = {w: node for w, node in (node_loss["after"] or {}).items() if w.startswith("rollout-")}
    assert after and set(after.values()) == {node_loss["survivor"]}, node_loss["after"]
    # And the weights still reached it after every update.
    assert summary["weight_version"] == n and summary["worker_weight_versions"] == [n]


def test_an_unplaceable_replacement_neither_stalls_the_run_nor_counts_as_failures(node_loss):
    summary, rows = node_loss["summary"], node_loss["rows"]
    # Only the worker on the removed node failed; its replacement waits for a node without being
    # killed, counted or replaced again.
    assert summary["worker_failures"] == 1, summary["scaling_events"]
    started = [e for e in summary["scaling_events"] if e.startswith("+")]
    assert len(started) <= 3, summary["scaling_events"]  # the two first workers and one replacement
    # No node had room for it to the end: the run ended with it still waiting, and says so.
    assert summary["rollout_workers_starting"] == [started[-1][1:]], summary["scaling_events"]
    # And the surviving worker goes on at its own pace: no iteration after the removal waits a call timeout.
    times = [r["time"] for r in rows if r["phase"] == "on_policy"]
    after = [b - a for a, b in zip(times, times[1:], strict=False) if b > node_loss["removed_at"]]
    assert after and max(after) < NODE_LOSS_CALL_TIMEOUT_S, after


def test_the_controller_runs_on_the_drivers_node(nodes, node_loss):
    # Pinned there (cluster/placement.py): left to Ray it landed on any node, once on the rollout node
    # that went, and the run died with it.
    cluster, _, _ = nodes
    assert node_loss["placed"]["controller"] == cluster.head_node.node_id  # where the driver runs (see `nodes`)
