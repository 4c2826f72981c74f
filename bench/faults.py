"""The toy job under fire: rollout workers, reward servers and a learner killed at seeded random
moments and the Redis server restarted once, while the run goes on with no operator action.

    python -m bench.faults --json
    python -m bench.faults --json --seed 3 --kills 4 --learner-kills 2 run.iterations=12

Prints faults_injected, groups_expected, groups_produced, groups_lost, groups_duplicated,
groups_retrained, buffer_items_before_restart, buffer_items_after_restart, finished, and the run's
failure counters (learner_restarts among them). "Lost" is a scheduled group that never reached
training (on-policy) or the buffer (reference); "duplicated" one that got there twice in the
weights that survive. A learner that dies is replaced and restored from the newest complete
checkpoint, and the iterations after it are redone: the records of those first tries are rolled
back (cluster.driver.surviving_rows) and counted in "groups_retrained". Lost and duplicated must be
0: a lost actor costs time, not data. The Redis here is an external one (replay.redis_url), so the
injector can restart it under the job.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path


def _kill_one(prefix: str, namespace: str, count: int = 8, start: int = 0) -> str | None:
    import ray

    for i in range(start, start + count):
        try:
            actor = ray.get_actor(f"{prefix}-{i}", namespace=namespace)
        except ValueError:
            continue
        ray.kill(actor, no_restart=False)
        return f"{prefix}-{i}"
    return None


def _job_ids(records: list[dict]) -> Counter:
    """(phase, job id) of every group the reference and on-policy records name, with multiplicity."""
    phases = ("reference", "on_policy")
    return Counter((r["phase"], j) for r in records if r.get("phase") in phases for j in r["job_ids"])


def run_with_faults(
    config_overrides: list[str], seed: int, kills: int, root: Path, config_path: str, learner_kills: int = 1
) -> dict:
    """`kills` rollout workers and reward servers (alternately) and `learner_kills` learner ranks
    killed at seeded moments of the on-policy phase, after one Redis restart."""
    from cluster.driver import surviving_rows
    from cluster.local import ray_env_defaults
    from cluster.train import RunFolder, run
    from common.config import load_config
    from common.dataflow.redis_server import EmbeddedRedis
    from common.dataflow.replay import ReplayBuffer

    name = f"faults{uuid.uuid4().hex[:6]}"
    redis = EmbeddedRedis(root / "redis")
    redis.start()
    cfg = load_config(
        config_path,
        [
            *config_overrides,
            f"run.name={name}",
            f"run.output_dir={root}",
            f"cluster.namespace={name}",
            f"replay.redis_url={redis.url}",
        ],
    )
    folder = root / name
    rng = random.Random(seed)
    events: list[str] = []
    buffer_counts = {}
    stop = threading.Event()

    def records() -> list[dict]:
        path = folder / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def rows(phase: str, of: list[dict] | None = None) -> list[dict]:
        return [r for r in (records() if of is None else of) if r.get("phase") == phase]

    def injector():
        # Restart Redis once the reference buffer is in, then kill actors while on-policy training runs.
        while not stop.is_set() and not rows("reference"):
            time.sleep(0.05)
        if stop.is_set():
            return
        probe = ReplayBuffer(redis.url, name)
        buffer_counts["before"] = probe.size()
        redis.restart()
        events.append("restart redis")
        buffer_counts["after"] = probe.size()
        probe.close()
        total = cfg.run.iterations
        moments = sorted(rng.sample(range(1, max(2, total)), min(kills, max(1, total - 1))))
        plan = [(at, "rollout" if k % 2 == 0 else "reward") for k, at in enumerate(moments)]
        # Learner ranks die at moments of their own (the same moment as another kill is allowed).
        plan += [(rng.randrange(1, max(2, total)), "learner") for _ in range(learner_kills)]
        for at, role in sorted(plan):
            # On-policy records so far, rolled-back ones included: a moment is a point in wall time.
            while not stop.is_set() and len(rows("on_policy")) < at:
                time.sleep(0.05)
            if stop.is_set():
                return
            time.sleep(rng.uniform(0.0, 1.0))  # somewhere inside the iteration
            start = rng.randrange(cfg.learner.num_workers) if role == "learner" else 0
            victim = _kill_one(role, name, count=1 if role == "learner" else 8, start=start)
            if victim:
                events.append(f"kill {victim}")

    ray_env_defaults()
    thread = threading.Thread(target=injector, daemon=True)
    thread.start()
    finished, error = False, None
    try:
        summary = run(cfg, RunFolder(folder))
        finished = True
    except Exception as exc:  # the figure to report, not to hide
        summary, error = {}, f"{type(exc).__name__}: {exc}"
    finally:
        stop.set()
        thread.join(timeout=10)
    buffer = ReplayBuffer(redis.url, name)
    final_items = buffer.size()
    buffer.close()
    redis.stop()

    per_iter = cfg.rollout.prompts_per_iteration
    expected = {("reference", i) for i in range(cfg.replay.num_reference_groups)}
    offset = cfg.replay.num_reference_groups
    expected |= {("on_policy", offset + i) for i in range(cfg.run.iterations * per_iter)}
    # What reached training in the weights that survive: the records a learner restore rolled back
    # (their updates died with the learner) are left out, and counted apart.
    every = records()
    produced, tried = _job_ids(surviving_rows(every)), _job_ids(every)
    return {
        "faults_injected": len(events),
        "events": events,
        "groups_expected": len(expected),
        "groups_produced": sum(produced.values()),
        "groups_lost": len(expected - set(produced)),
        "groups_duplicated": sum(n - 1 for n in produced.values() if n > 1),
        "groups_retrained": sum(tried.values()) - sum(produced.values()),
        "learner_restores": [
            {k: r.get(k) for k in ("checkpoint", "completed", "at", "version", "jobs_given_up")}
            for r in rows("restore", every)
        ],
        "buffer_items_before_restart": buffer_counts.get("before"),
        "buffer_items_after_restart": buffer_counts.get("after"),
        "buffer_items_final": final_items,
        "finished": finished,
        "error": error,
        "worker_failures": summary.get("worker_failures"),
        "jobs_redone": summary.get("jobs_redone"),
        "reward_failures": summary.get("reward_failures"),
        "learner_restarts": summary.get("learner_restarts"),
        "wall_seconds": summary.get("wall_seconds"),
        "weight_version": summary.get("weight_version"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments and victims")
    parser.add_argument(
        "--kills", type=int, default=3, help="rollout workers and reward servers killed during on-policy training"
    )
    parser.add_argument("--learner-kills", type=int, default=1, help="learner ranks killed during on-policy training")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    defaults = [
        "run.phases=[reference,on_policy]",
        "run.iterations=8",
        "replay.num_reference_groups=4",
        "rollout.num_workers=2",
        "rollout.prompts_per_iteration=2",
        "run.eval_prompts=2",
        "run.eval_seeds=1",
        "run.sample_prompts=0",
        "algorithm.group_size=4",
        "algorithm.num_anchors=2",
        "cluster.num_cpus=4",
        "metrics.port=0",
        "run.checkpoint_every=3",  # a learner restore goes back to the newest of these (or a phase end)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        result = run_with_faults(
            defaults + args.overrides, args.seed, args.kills, Path(tmp), args.config, args.learner_kills
        )
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    ok = result["finished"] and result["groups_lost"] == 0 and result["groups_duplicated"] == 0
    # Every learner killed was replaced by the job itself.
    killed = sum(e.startswith("kill learner") for e in result["events"])
    return 0 if ok and (result["learner_restarts"] or 0) >= killed else 1


if __name__ == "__main__":
    sys.exit(main())
