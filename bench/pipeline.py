"""Throughput of the distributed job against the same work in one process.

    python -m bench.pipeline --json                       # toy config, 2 rollout workers
    python -m bench.pipeline --json --iterations 8 rollout.num_workers=3

Prints, as one JSON object:
- distributed_groups_per_s: on-policy groups per second of the Ray job (rollout workers, reward
  server, learner, weight broadcast after every update), timed over the on-policy phase only;
- sequential_groups_per_s: the same groups and updates done in one process with the same code
  (collect_group, arcopo_update), and `speedup` = distributed / sequential;
- role_busy_ratio: the share of wall time each role was working;
- weight_sync_seconds / weight_sync_bytes: one publish + delivery to every rollout worker;
- replay_insert_per_s / replay_sample_per_s: the Redis buffer with the toy group record, next to
  redis_raw_set_per_s / redis_raw_get_per_s: plain SET/GET of a payload of the same size.
On a 2-core laptop the distributed run cannot be faster than one process (the roles share two
cores and pay for serialisation); the figure to watch there is the overhead, and on a cluster the
speedup with more rollout workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import Config


def distributed(cfg: Config, root: Path) -> dict:
    from cluster.train import RunFolder, run

    folder = RunFolder(root / "distributed")
    summary = run(cfg, folder)
    rows = [json.loads(x) for x in folder.metrics_path.read_text().splitlines()]
    on = [r for r in rows if r["phase"] == "on_policy"]
    evals = [r for r in rows if r["phase"] == "eval"]
    start = evals[0]["time"]  # the on-policy phase starts after the first evaluation
    seconds = on[-1]["time"] - start
    groups = sum(r["groups"] for r in on)
    return {
        "groups": groups,
        "seconds": seconds,
        "groups_per_s": groups / seconds,
        "role_busy_ratio": summary["role_busy_ratio"],
        "weight_sync_seconds": summary["weight_sync_seconds"],
        "weight_sync_bytes": summary["weight_sync_bytes"],
    }


def sequential(cfg: Config) -> dict:
    import torch

    from actors.rollout import collect_group
    from cluster.prompts import load_prompts
    from common.dataflow.jobs import make_job
    from common.model import adapters
    from common.model.policy import Policy
    from learner.update import UpdateSettings, arcopo_update
    from learner.worker import anchor_generator
    from rewards.server import build_reward_models, score_batch

    policy = Policy.from_config(cfg)
    models = build_reward_models(cfg)
    prompts, _ = load_prompts(cfg)
    weights = {t.name: t.weight for t in cfg.rewards.terms}
    settings = UpdateSettings.from_config(cfg)
    params = adapters.train_adapter(policy.model, adapters.ON_POLICY)
    optimizer = torch.optim.AdamW(params, lr=cfg.learner.lr)
    per_iter, a = cfg.rollout.prompts_per_iteration, cfg.algorithm
    start, job_id, groups = time.perf_counter(), 0, 0
    for it in range(cfg.run.iterations):
        batch = []
        policy.model.requires_grad_(False)
        policy.set_mode(adapters.ON_POLICY)
        for _ in range(per_iter):
            job = make_job(cfg.run.seed, "on_policy", job_id, prompts, cfg.sampler.num_chunks, "on_policy")
            job_id += 1
            batch.append(
                collect_group(
                    policy.sampler,
                    policy.text([job.prompt]),
                    job.prompt,
                    pivot=job.pivot,
                    group_size=a.group_size,
                    sigma=a.fork_sigma,
                    plan_seed=job.plan_seed,
                    fork_seed=job.fork_seed,
                    decode=policy.decode,
                    reward_fn=lambda v, ps: score_batch(models, v, ps),
                    weights=weights,
                    policy_version=it,
                    adapter="on_policy",
                )
            )
        params = adapters.train_adapter(policy.model, adapters.ON_POLICY)
        arcopo_update(
            policy.sampler,
            batch,
            [g.rewards for g in batch],
            [policy.text([g.prompt]) for g in batch],
            params,
            optimizer,
            settings,
            anchor_generators=[anchor_generator(cfg.run.seed, it, i) for i in range(len(batch))],
        )
        groups += len(batch)
    seconds = time.perf_counter() - start
    return {"groups": groups, "seconds": seconds, "groups_per_s": groups / seconds}


def replay_rates(cfg: Config, root: Path, items: int) -> dict:
    import redis
    import torch

    from actors.rollout import collect_group
    from common.dataflow.redis_server import EmbeddedRedis
    from common.dataflow.replay import ReplayBuffer
    from common.model.policy import Policy
    from rewards.server import build_reward_models, score_batch

    policy = Policy.from_config(cfg)
    models = build_reward_models(cfg)
    weights = {t.name: t.weight for t in cfg.rewards.terms}
    prompt = "a red circle moving left on a black background"
    group = collect_group(
        policy.sampler,
        policy.text([prompt]),
        prompt,
        pivot=1,
        group_size=cfg.algorithm.group_size,
        sigma=cfg.algorithm.fork_sigma,
        plan_seed=1,
        fork_seed=2,
        decode=policy.decode,
        reward_fn=lambda v, ps: score_batch(models, v, ps),
        weights=weights,
        policy_version=0,
        adapter="semi",
    )
    key = b"bench-key-0123456789abcdef012345"
    payload = group.to_bytes(key=key)
    with EmbeddedRedis(root / "redis") as server:
        buffer = ReplayBuffer(server.url, "bench", key=key, capacity=items + 1)
        t0 = time.perf_counter()
        for _ in range(items):
            buffer.insert(group)
        insert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(items):
            buffer.sample(1, seed=i)
        sample_s = time.perf_counter() - t0
        raw = redis.Redis.from_url(server.url)
        t0 = time.perf_counter()
        for i in range(items):
            raw.set(f"raw:{i}", payload)
        set_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(items):
            raw.get(f"raw:{i}")
        get_s = time.perf_counter() - t0
        raw.close()
        buffer.close()
    del torch
    return {
        "record_bytes": len(payload),
        "replay_insert_per_s": items / insert_s,
        "replay_sample_per_s": items / sample_s,
        "redis_raw_set_per_s": items / set_s,
        "redis_raw_get_per_s": items / get_s,
        "insert_overhead_vs_raw": set_s and insert_s / set_s,
        "sample_overhead_vs_raw": get_s and sample_s / get_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--replay-items", type=int, default=100)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    from common.config import load_config_for_cli

    defaults = [
        "run.phases=[on_policy]",
        f"run.iterations={args.iterations}",
        "rollout.num_workers=2",
        "rollout.prompts_per_iteration=4",
        "run.eval_prompts=2",
        "run.eval_seeds=1",
        "run.sample_prompts=0",
        "rollout.num_cpus_per_worker=0.5",
        "rewards.num_cpus_per_server=0.5",
        "learner.num_cpus_per_worker=0.5",
        "cluster.num_cpus=4",
        "metrics.port=0",
    ]
    cfg = load_config_for_cli(args.config, defaults + args.overrides)
    if cfg is None:
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": root, "name": "bench"})})
        dist = distributed(cfg, root)
        seq = sequential(cfg)
        replay = replay_rates(cfg, root, args.replay_items)
    result = {
        "rollout_workers": cfg.rollout.num_workers,
        "groups": dist["groups"],
        "distributed_groups_per_s": dist["groups_per_s"],
        "sequential_groups_per_s": seq["groups_per_s"],
        "speedup": dist["groups_per_s"] / seq["groups_per_s"],
        "role_busy_ratio": dist["role_busy_ratio"],
        "weight_sync_seconds": dist["weight_sync_seconds"],
        "weight_sync_bytes": dist["weight_sync_bytes"],
        **replay,
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
