"""The toy job under fire: rollout workers and reward servers killed at seeded random moments and the
Redis server restarted once, while the run goes on.

    python -m bench.faults --json
    python -m bench.faults --json --seed 3 --kills 4 run.iterations=12

Prints faults_injected, groups_expected, groups_produced, groups_lost, groups_duplicated,
buffer_items_before_restart, buffer_items_after_restart, finished, and the run's failure counters.
"Lost" is a scheduled group that never reached training (on-policy) or the buffer (reference);
"duplicated" one that got there twice. Both must be 0: a lost worker costs time, not data.
The Redis here is an external one (replay.redis_url), so the injector can restart it under the job.
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


def _kill_one(prefix: str, namespace: str, count: int = 8) -> str | None:
    import ray

    for i in range(count):
        try:
            actor = ray.get_actor(f"{prefix}-{i}", namespace=namespace)
        except ValueError:
            continue
        ray.kill(actor, no_restart=False)
        return f"{prefix}-{i}"
    return None


def run_with_faults(config_overrides: list[str], seed: int, kills: int, root: Path, config_path: str) -> dict:

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

    def rows(phase: str) -> list[dict]:
        path = folder / "metrics.jsonl"
        if not path.exists():
            return []
        return [r for r in (json.loads(x) for x in path.read_text().splitlines()) if r.get("phase") == phase]

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
        for k, at in enumerate(moments):
            while not stop.is_set() and len(rows("on_policy")) < at:
                time.sleep(0.05)
            if stop.is_set():
                return
            time.sleep(rng.uniform(0.0, 1.0))  # somewhere inside the iteration
            victim = _kill_one("rollout" if k % 2 == 0 else "reward", name)
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
    produced = Counter((phase, j) for phase in ("reference", "on_policy") for r in rows(phase) for j in r["job_ids"])
    return {
        "faults_injected": len(events),
        "events": events,
        "groups_expected": len(expected),
        "groups_produced": sum(produced.values()),
        "groups_lost": len(expected - set(produced)),
        "groups_duplicated": sum(n - 1 for n in produced.values() if n > 1),
        "buffer_items_before_restart": buffer_counts.get("before"),
        "buffer_items_after_restart": buffer_counts.get("after"),
        "buffer_items_final": final_items,
        "finished": finished,
        "error": error,
        "worker_failures": summary.get("worker_failures"),
        "jobs_redone": summary.get("jobs_redone"),
        "reward_failures": summary.get("reward_failures"),
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
    parser.add_argument("--kills", type=int, default=3, help="actors killed during on-policy training")
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
        "run.checkpoint_every=1000",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        result = run_with_faults(defaults + args.overrides, args.seed, args.kills, Path(tmp), args.config)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if result["finished"] and result["groups_lost"] == 0 and result["groups_duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
