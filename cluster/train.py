"""The main job: AR-CoPO on a Ray cluster, from one config.

    python -m cluster.train --config configs/toy.yaml                  # local Ray, embedded Redis
    python -m cluster.train --config configs/toy.yaml run.name=try2 run.iterations=20
    ray job submit --working-dir . -- python -m cluster.train --config configs/toy.yaml

With no cluster address (neither cluster.address nor RAY_ADDRESS, which `ray job submit` sets) it
starts a local Ray on loopback; with no replay.redis_url it starts an embedded redis-server. It
tears down only what it started. The schedule is run.phases (reference, semi, on_policy, merge).

Everything lands in runs/<run.name>/: report.html (before/after videos side by side, the score
table with standard errors, the plots: open it in a browser), config.yaml (resolved, credentials
redacted), metrics.jsonl (one line per iteration and phase), adapters/ (diffusers Wan LoRA files,
loadable with `WanPipeline.load_lora_weights`), export/ (the chosen merged policy folded into one
LoRA file, with model_card.md), checkpoints/, samples/{start,end}_<i>.mp4, reward_curve.png,
merge_sweep.png and summary.json (scores with their standard errors, the merge choice, counters).

While it runs, Prometheus metrics are served on metrics.host:metrics.port (http://127.0.0.1:9464/metrics
by default) and `python -m cluster.scale --rollout N` grows or shrinks the rollout workers. After a
crash, the same command with --resume continues from the newest complete checkpoint; with
--resume auto (what a RayJob's retry runs) it continues when there is one and starts afresh otherwise.
A learner that dies is replaced and restored inside the job (run.max_learner_restarts).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import secrets
import shutil
import sys
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from common.config import Config, ConfigError, load_config_for_cli, preflight, redacted_dump
from common.durable import write_bytes_atomic

log = logging.getLogger("arcopo")

# The schedule itself is cluster.driver.Driver.fit; this module owns the command line, the Ray and
# Redis sessions, the run folder, the plots and the summary.


# What a job writes into its run folder, beside the files a fresh start keeps (the record key, the
# prompt-embedding cache and the embedded Redis's AOF, whose buffer is cleared through Redis).
RUN_OUTPUTS = (
    "metrics.jsonl",
    "summary.json",
    "report.html",
    "reward_curve.png",
    "merge_sweep.png",
    "config.yaml",
    "samples",
    "tensorboard",
    "checkpoints",
    "adapters",
    "export",
)


class RunFolder:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.metrics_path = root / "metrics.jsonl"
        self.started = time.time()

    def log(self, record: dict) -> None:
        record = {"time": round(time.time() - self.started, 3), **record}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        write_bytes_atomic(self.root / name, (json.dumps(data, indent=2, allow_nan=True) + "\n").encode())

    def clear_outputs(self) -> list[str]:
        """Remove what an earlier attempt of this run wrote (RUN_OUTPUTS), so a fresh start does not
        append to its metrics or mix its files with the new ones; returns the names removed."""
        removed = []
        for name in RUN_OUTPUTS:
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            removed.append(name)
        return removed

    def save_samples(self, tag: str, prompts: list[str], videos: list[bytes]) -> list[str]:
        """samples/<tag>_<i>.mp4 and samples/prompts.txt; the mp4 paths, relative to the run folder."""
        paths = []
        for i, (_, data) in enumerate(zip(prompts, videos, strict=True)):
            path = write_bytes_atomic(self.root / "samples" / f"{tag}_{i}.mp4", data)
            paths.append(str(path.relative_to(self.root)))
        (self.root / "samples" / "prompts.txt").write_text("\n".join(prompts) + "\n")
        return paths


def plot_rewards(metrics_path: Path, out: Path, initial: float, final: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    on = [r for r in rows if r.get("phase") == "on_policy" and "reward_mean" in r]
    if on:
        axes[0].plot([r["iteration"] for r in on], [r["reward_mean"] for r in on], ".", alpha=0.4, label="group mean")
        k = max(1, len(on) // 10)
        smooth = [
            sum(x["reward_mean"] for x in on[max(0, i - k + 1) : i + 1]) / len(on[max(0, i - k + 1) : i + 1])
            for i in range(len(on))
        ]
        axes[0].plot([r["iteration"] for r in on], smooth, "-", label=f"moving mean ({k})")
    axes[0].axhline(initial, color="gray", ls="--", label=f"eval before {initial:.3f}")
    axes[0].axhline(final, color="green", ls="--", label=f"eval after {final:.3f}")
    axes[0].set(title="on-policy training reward", xlabel="iteration", ylabel="reward")
    axes[0].legend(fontsize=7)
    for phase, style in (("semi", "-"), ("on_policy", "-")):
        pts = [r for r in rows if r.get("phase") == phase and "loss" in r]
        if pts:
            axes[1].plot([r["iteration"] for r in pts], [r["loss"] for r in pts], style, label=phase)
    axes[1].set(title="AR-CoPO loss", xlabel="iteration")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def check_job(config: Config) -> None:
    """Refuses, with ConfigError, a config this job cannot run: before Ray, Redis or any actor."""
    if not config.run.phases:
        # The job would still evaluate and sample the base model, which needs rewards and prompts
        # that a model-only config (configs/tiny.yaml) does not name.
        raise ConfigError(
            "run.phases: empty, which describes a model only (configs/tiny.yaml); cluster.train "
            "needs at least one of reference, semi, on_policy, merge"
        )
    preflight(config)


def run(config: Config, folder: RunFolder, linger_s: float = 0.0, resume: bool | str = False) -> dict:
    """The job. `resume`: False, a fresh run; True (--resume), continue from the newest complete
    checkpoint; "auto" (--resume auto), continue from it if there is one, else start afresh over
    whatever an earlier attempt that died before its first checkpoint left (its outputs and its
    partial replay buffer are removed)."""
    check_job(config)
    from cluster.checkpoints import latest_checkpoint, read_checkpoint_state
    from cluster.controller import Counters
    from cluster.driver import Driver
    from cluster.local import ray_session, redis_session
    from cluster.placement import RunRoles, encode_prompts
    from cluster.prompts import load_prompts
    from cluster.tracking import tracked
    from common.dataflow.replay import ReplayBuffer, ReplayError
    from common.metrics import RunMetrics
    from common.model.prompt_cache import with_cache_path

    checkpoint = latest_checkpoint(folder.root / "checkpoints") if resume else None
    if resume == "auto" and checkpoint is None:
        removed = folder.clear_outputs()
        log.info("--resume auto: no complete checkpoint, starting afresh%s", f" (removed {removed})" if removed else "")
    prompts, heldout = load_prompts(config)
    # Every role reads the prompt embeddings from this one file (config.yaml names it too).
    config = with_cache_path(config, folder.root)
    resolved = redacted_dump(config)
    write_bytes_atomic(folder.root / "config.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
    start = time.perf_counter()
    with ray_session(config) as local_ray, redis_session(config, folder.root) as redis:
        log.info(
            "ray: %s; redis: %s (%s)",
            "local" if local_ray else "joined cluster",
            redis.display,
            "embedded" if redis.embedded else "external",
        )
        # Records travel between actors and through Redis with an HMAC digest under this key, so a
        # record written by anyone else (or altered) is refused.
        record_key = _record_key(folder.root)
        replay = {"url": redis.url, "name": config.run.name}
        if resume is True and checkpoint is None:
            log.warning(
                "--resume: no complete checkpoint in %s; starting from the beginning", folder.root / "checkpoints"
            )
        monitor = ReplayBuffer(redis.url, config.run.name)  # counters only; records stay in Redis
        completed = read_checkpoint_state(checkpoint)["completed"] if checkpoint else []
        leftover = monitor.size()
        if "reference" in config.run.phases and "reference" not in completed and leftover:
            if not resume:
                monitor.close()
                raise ReplayError(
                    f"replay buffer {config.run.name!r} at {redis.display} already holds {leftover} "
                    "items (an earlier run of the same run.name?): pick another run.name, pass "
                    "--resume to continue that run, or clear it"
                )
            # A reference phase cut short left some of its groups in Redis: start it afresh (same
            # jobs, same groups) rather than train on a partial or doubled buffer. So does a fresh
            # start under --resume auto, over what an attempt that died before its first checkpoint left.
            log.info("reference phase was interrupted: cleared %d partial items, collecting again", monitor.clear())
        # Training, held-out and so evaluation and sample prompts (both are training prompts), encoded
        # once before learners (which never load the text encoder) and rollout workers start.
        encoded = encode_prompts(config, [*prompts, *heldout])
        log.info(
            "prompt embeddings: %d prompts in %s (%d encoded now, %.1f s)",
            encoded["prompts"],
            encoded["path"],
            encoded["encoded"],
            encoded["seconds"],
        )
        counters = Counters()
        metrics = RunMetrics(config.run.name)
        roles = RunRoles(config, replay, record_key, counters, metrics=metrics)
        roles_started = time.perf_counter()
        tensorboard_dir = folder.root / "tensorboard" if config.run.tensorboard else None
        log_metrics, save_samples, close_tracking = tracked(folder.log, folder.save_samples, tensorboard_dir)
        try:
            metrics.serve(config.metrics.host, config.metrics.port)
            driver = Driver(
                config,
                roles,
                counters,
                prompts,
                log_metrics=log_metrics,
                save_samples=save_samples,
                metrics=metrics,
                replay_stats=monitor.stats,
                progress_bar=tqdm,
                checkpoint_dir=folder.root / "checkpoints",
                heldout=heldout,
            )
            result = driver.fit(resume_from=checkpoint)
            saved = driver.save_adapters(folder.root / "adapters")
            busy = roles.busy_ratios(time.perf_counter() - roles_started)
            worker_versions = roles.worker_weight_versions()
            phases = config.run.phases
            before, after = result.before, result.after
            summary = {
                "reward_initial": before.in_domain.mean,
                "reward_final": after.in_domain.mean,
                "ood_initial": before.out_of_domain.mean,
                "ood_final": after.out_of_domain.mean,
                "reward_initial_stderr": before.in_domain.stderr,
                "reward_final_stderr": after.in_domain.stderr,
                "ood_initial_stderr": before.out_of_domain.stderr,
                "ood_final_stderr": after.out_of_domain.stderr,
                "eval_videos": {"in_domain": before.in_domain.n, "out_of_domain": before.out_of_domain.n},
                "scores": score_rows(result),
                "iterations": config.run.iterations if "on_policy" in phases else 0,
                "groups": counters.groups,
                "wall_seconds": time.perf_counter() - start,
                "final_policy": result.final_policy,
                "merge_scale": result.merge_scale,
                **result.merge,
                "weight_version": driver.version,
                "worker_weight_versions": worker_versions,
                "weight_syncs": counters.weight_syncs,
                "weight_sync_bytes": counters.weight_sync_bytes,
                "dropped_stale": counters.dropped_stale,
                "max_staleness_trained": counters.stale_trained_max,
                "reward_failures": counters.reward_failures,
                "worker_failures": counters.worker_failures,
                "jobs_redone": counters.jobs_redone,
                "heartbeats_missed": counters.heartbeats_missed,
                "learner_restarts": counters.learner_restarts,
                "weight_sync_workers_lost": counters.weight_sync_workers_lost,
                "weight_sync_retries": counters.weight_sync_retries,
                "rollout_workers_final": len(roles.rollout_workers()),
                # Replacements (or scaled-up workers) not up when the run ended: not in worker_weight_versions.
                "rollout_workers_starting": roles.starting_rollout_workers(),
                "scaling_events": roles.scaling_events(),
                "role_busy_ratio": busy,
                "weight_sync_seconds": counters.weight_sync_seconds,
                "weight_sync_log": counters.weight_sync_log,
                "role_peak_rss_bytes": roles.peak_rss_bytes(),
                "components_initial": result.before_parts,
                "components_final": result.after_parts,
                "adapters": [str(Path(p).relative_to(folder.root)) for p in saved],
                "samples": result.samples,
            }
        finally:
            roles.shutdown()
            close_tracking()
            time.sleep(linger_s)  # lets a scraper read the final values (tests, short demos)
            metrics.close()
    plot_rewards(
        folder.metrics_path, folder.root / "reward_curve.png", summary["reward_initial"], summary["reward_final"]
    )
    if summary.get("sweep"):
        from cluster.evaluate import plot_sweep

        plot_sweep(summary["sweep"], summary["scores"][0], folder.root / "merge_sweep.png")
    if summary["final_policy"] == "merged":
        # The chosen policy as one diffusers-loadable LoRA with its model card (learner/export.py).
        from learner.export import export_policy

        export = export_policy(
            config, folder.root, summary["merge_scale"], folder.root / "export", scores=summary["scores"]
        )
        summary["export"] = str(export.relative_to(folder.root))
    folder.write_json("summary.json", summary)
    from cluster.report import write_report

    write_report(folder.root, run_report(config, summary, prompts))
    return summary


def run_report(config: Config, summary: dict, prompts: list[str]) -> dict:
    """What report.html shows of a finished run (cluster/report.py)."""
    from cluster.evaluate import score_names

    start, end = summary["samples"].get("start", []), summary["samples"].get("end", [])
    final = summary["scores"][-1]["policy"]
    warnings = []
    if "merge" in config.run.phases:
        if summary["dual_improvement_passed"]:
            verdict = (
                f"Merged at s = {summary['merge_scale']:g}, the largest scale whose in-domain and "
                "out-of-domain scores both beat the base (dual-improvement rule)."
            )
        else:
            verdict = (
                f"No merge scale passed the dual-improvement rule; the run ends on run.merge_scale = "
                f"{summary['merge_scale']:g}, which is NOT an aligned model by that rule."
            )
            warnings.append("No swept merge scale raised both scores over the base.")
        warnings += [
            f"At s = {summary['merge_scale']:g} the {m}: within two standard errors, not resolved by "
            "this evaluation set."
            for m in summary.get("within_two_stderr", [])
        ]
    else:
        verdict = f"The run ends on {final} (no merge phase, so no dual-improvement choice)."
    minutes = summary["wall_seconds"] / 60
    return {
        "title": f"AR-CoPO run {config.run.name}",
        "subtitle": f"phases {', '.join(config.run.phases)}; {summary['groups']} groups; {minutes:.1f} min",
        "verdict": verdict,
        "warnings": warnings,
        "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, start, end, strict=False)],
        "before_label": "reference (base), start of the run",
        "after_label": f"{final}, end of the run",
        "scores": summary["scores"],
        "score_names": score_names(config),
        "plots": [
            {"title": "merge sweep", "path": "merge_sweep.png"},
            {"title": "training reward and loss", "path": "reward_curve.png"},
        ],
        "facts": {
            "evaluation videos": f"{summary['eval_videos']['in_domain']} in-domain, "
            f"{summary['eval_videos']['out_of_domain']} out-of-domain",
            "on-policy iterations": summary["iterations"],
            "groups rolled out": summary["groups"],
            "weight syncs": summary["weight_syncs"],
            "dropped stale groups": summary["dropped_stale"],
            "worker failures": summary["worker_failures"],
            "export": summary.get("export", "none (no merge phase)"),
        },
    }


def score_rows(result) -> list[dict]:
    """The run's score table (report, model card): each policy's [mean, stderr] per score."""
    rows = [{"policy": "reference (base)", **result.before.as_row()}]
    if "on_policy_alone" in result.merge:
        rows.append({"policy": "on-policy adapter alone", **result.merge["on_policy_alone"]})
    label = f"merged, s = {result.merge_scale:g}" if result.final_policy == "merged" else result.final_policy
    rows.append({"policy": label, **result.after.as_row()})
    return rows


def _record_key(root: Path) -> bytes:
    """The run's HMAC key for records (in Redis and between actors): made once, kept in the run folder
    (mode 0600) so a resumed run can read the buffer it left behind."""
    import os

    path = root / "record.key"
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser's arguments, with `--resume auto` (or `--resume=auto`) giving resume == "auto"; a bare
    `--resume` stays the flag it always was (True), whatever follows it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    auto = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--resume=auto" or (argv[i] == "--resume" and argv[i + 1 : i + 2] == ["auto"]):
            auto = True
            i += 1 if argv[i] == "--resume=auto" else 2
            continue
        rest.append(argv[i])
        i += 1
    args = parser.parse_intermixed_args(rest)
    if auto:
        args.resume = "auto"
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/toy.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace runs/<run.name>/ if it exists (otherwise an existing run folder is refused)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue runs/<run.name>/ from its newest complete checkpoint (same config and overrides); "
        "`--resume auto`: continue if there is one, else start afresh over what an earlier attempt left "
        "(the entrypoint of a retried RayJob)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.name=try2 run.iterations=20")
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config_for_cli(args.config, args.overrides)
    if config is None:
        return 2
    try:
        check_job(config)  # before --overwrite deletes anything
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    root = Path(config.run.output_dir) / config.run.name
    if root.exists() and any(root.iterdir()) and not args.resume:
        if not args.overwrite:
            print(f"run folder {root} already exists: pick another run.name=..., or pass --overwrite", file=sys.stderr)
            return 2
        shutil.rmtree(root)
    folder = RunFolder(root)
    from cluster.placement import PlacementError
    from cluster.prompts import PromptError
    from common.dataflow.replay import ReplayError
    from common.model.prompt_cache import PromptCacheError

    try:
        summary = run(config, folder, resume=args.resume)
    except (PromptError, PromptCacheError, PlacementError, ReplayError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from ray.exceptions import RayError

        if not isinstance(exc, RayError):
            raise
        # An actor's failure (a full or out-of-memory Redis, a dead learner): one clear line, not
        # a wall of remote tracebacks; everything up to the last checkpoint is kept.
        cause = getattr(exc, "cause", None) or exc
        lines = [x for x in str(cause).strip().splitlines() if x.strip()]
        print(f"error: {type(cause).__name__}: {lines[-1] if lines else cause}", file=sys.stderr)
        print(f"the run stopped; `--resume` continues it from {root / 'checkpoints'}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "reward_initial",
                    "reward_final",
                    "ood_initial",
                    "ood_final",
                    "iterations",
                    "groups",
                    "wall_seconds",
                )
            }
        )
    )
    print(f"run folder: {root}")
    return 0 if all(math.isfinite(summary[k]) for k in ("reward_initial", "reward_final")) else 1


if __name__ == "__main__":
    sys.exit(main())
