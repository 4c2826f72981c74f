"""Evaluate a run's adapters: videos for a prompt set, in-domain rewards and the out-of-domain score
per merge scale, the dual-improvement rule, and a report you can read and watch.

    python -m cluster.evaluate --config configs/toy.yaml --adapters runs/demo
    python -m cluster.evaluate --config configs/toy.yaml --adapters runs/demo --prompts my_prompts.txt \\
        --scales 0 0.5 1 --seeds 4

Writes <adapters>/eval/: report.md (tables), scores.json, merge_sweep.png (reward and OOD against
the merge scale) and videos/<policy>_<i>.mp4 for the first prompts, so base and aligned samples sit
side by side. In-process (no Ray): this is the tool for checking a finished run on one machine.

The merged policy is W_base + dW_semi + s dW_on (docs/method.md section 5); `reference` is the base alone.
The chosen scale is the largest that raises the in-domain reward without lowering the OOD score.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from common.config import Config


def _scores(policy, models, weights, prompts, seeds, batch: int) -> dict[str, float]:
    from rewards.server import score_batch

    per_video: dict[str, list[float]] = {}
    for p, frames in policy.videos(prompts, seeds, batch):
        for k, v in score_batch(models, frames, p).items():
            per_video.setdefault(k, []).extend(v.tolist())
    means = {k: sum(v) / len(v) for k, v in per_video.items()}
    means["reward"] = sum(w * means[n] for n, w in weights.items())
    return means


def _plot(rows: list[dict], base: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["scale"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(scales, [r["reward"] for r in rows], "o-", label="in-domain reward")
    ax.axhline(base["reward"], color="C0", ls="--", lw=0.8, label="reward, reference")
    if "ood" in base:
        ax2 = ax.twinx()
        ax2.plot(scales, [r["ood"] for r in rows], "s-", color="C1", label="OOD score")
        ax2.axhline(base["ood"], color="C1", ls="--", lw=0.8)
        ax2.set_ylabel("OOD score")
        ax2.legend(loc="lower right", fontsize=7)
    ax.set(xlabel="merge scale s (W_base + dW_semi + s dW_on)", ylabel="reward", title="merge sweep")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def evaluate(config: Config, run_dir: Path, prompts: list[str], seeds: int, scales: list[float], videos: int) -> dict:
    from common.durable import write_bytes_atomic
    from common.model import adapters
    from common.model.policy import Policy
    from common.model.prompt_cache import DEFAULT_NAME, with_cache_path
    from common.video import encode_mp4
    from learner.merge import Scores, pick_merge_scale
    from rewards.server import build_reward_models

    if config.model.prompt_cache is None and (run_dir / DEFAULT_NAME).is_file():
        # The run's own prompt embeddings: the text encoder loads only for prompts the run never saw.
        config = with_cache_path(config, run_dir)
    policy = Policy.from_config(config, role="rollout")
    for name in adapters.ADAPTERS:
        adapters.load_adapter(policy.model, run_dir / "adapters" / name, name)
    models = build_reward_models(config)
    weights = {t.name: t.weight for t in config.rewards.terms}
    eval_prompts = [p for p in prompts for _ in range(seeds)]
    eval_seeds = [20_000 + s for _ in prompts for s in range(seeds)]
    out = run_dir / "eval"

    def measure(mode: str, scale: float = 1.0) -> dict:
        policy.set_mode(mode, scale)
        return _scores(policy, models, weights, eval_prompts, eval_seeds, config.run.eval_batch_size)

    def sample(tag: str, mode: str, scale: float = 1.0) -> list[str]:
        policy.set_mode(mode, scale)
        shown = prompts[:videos]
        if not shown:
            return []
        frames = [f for _, batch in policy.videos(shown, [7] * len(shown), config.run.eval_batch_size) for f in batch]
        paths = []
        for i, f in enumerate(frames):
            path = write_bytes_atomic(
                out / "videos" / f"{tag}_{i}.mp4", encode_mp4(f, fps=8.0, upscale=max(1, 128 // f.shape[1]))
            )
            paths.append(str(path.relative_to(out)))
        return paths

    base = measure("reference")
    rows = []
    for scale in tqdm(scales, desc="merge sweep"):
        rows.append({"scale": scale, **measure("merged", scale)})
    singles = {name: measure(name) for name in adapters.ADAPTERS}
    has_ood = "ood" in base
    pick = pick_merge_scale(
        Scores(base["reward"], base["ood"] if has_ood else 0.0),
        {r["scale"]: Scores(r["reward"], r["ood"] if has_ood else 0.0) for r in rows},
    )
    clips = {"reference": sample("reference", "reference")}
    if pick is not None:
        clips[f"merged_{pick:g}"] = sample(f"merged_{pick:g}", "merged", pick)
    for name in adapters.ADAPTERS:
        clips[name] = sample(name, name)

    result = {
        "prompts": len(prompts),
        "seeds": seeds,
        "reference": base,
        "adapters": singles,
        "sweep": rows,
        "chosen_scale": pick,
        "dual_improvement_passed": pick is not None,
        "videos": clips,
    }
    write_bytes_atomic(out / "scores.json", (json.dumps(result, indent=2) + "\n").encode())
    _plot(rows, base, out / "merge_sweep.png")
    components = [k for k in base if k not in ("reward",)]
    lines = [
        f"# Evaluation of {run_dir.name}",
        "",
        f"{len(prompts)} prompts x {seeds} noise seeds. In-domain reward = "
        + " + ".join(f"{w:g} {n}" for n, w in weights.items())
        + "; `ood` is never trained on.",
        "",
        "| policy | reward | " + " | ".join(components) + " |",
        "| --- | --- | " + " | ".join("---" for _ in components) + " |",
    ]

    def line(label: str, r: dict) -> str:
        return f"| {label} | {r['reward']:.4f} | " + " | ".join(f"{r[c]:.4f}" for c in components) + " |"

    lines.append(line("reference (base)", base))
    for name, r in singles.items():
        lines.append(line(f"{name} adapter alone", r))
    for r in rows:
        lines.append(line(f"merged, s = {r['scale']:g}", r))
    verdict = (
        f"**Chosen merge scale: {pick:g}** (the largest that raises the reward without lowering the OOD score)."
        if pick is not None
        else "**No merge scale passes the dual-improvement rule** (reward up and OOD not down)."
    )
    lines += ["", verdict, "", "![merge sweep](merge_sweep.png)", "", "## Samples (noise seed 7)", ""]
    for tag, paths in clips.items():
        lines.append(f"- {tag}: " + ", ".join(f"[{Path(p).name}]({p})" for p in paths))
    write_bytes_atomic(out / "report.md", ("\n".join(lines) + "\n").encode())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--adapters", type=Path, required=True, help="a run folder (holding adapters/)")
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="prompt file, one per line (default: rollout.prompts, or the toy world's first run.eval_prompts)",
    )
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per prompt")
    parser.add_argument(
        "--scales", type=float, nargs="+", default=None, help="merge scales (default: run.merge_scales)"
    )
    parser.add_argument("--videos", type=int, default=2, help="sample videos per policy")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    from cluster.prompts import PromptError, load_prompts, read_prompt_file
    from common.config import ConfigError, load_config_for_cli, preflight
    from common.model.adapters import AdapterError
    from common.model.prompt_cache import PromptCacheError

    config = load_config_for_cli(args.config, args.overrides)
    if config is None:
        return 2
    try:
        # --prompts replaces rollout.prompts; read_prompt_file names that file if it is missing.
        preflight(config, ignore=("rollout.prompts",) if args.prompts is not None else ())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        if args.prompts is not None:
            prompts = read_prompt_file(args.prompts)
        else:
            prompts = load_prompts(config)[0][: config.run.eval_prompts]
        result = evaluate(
            config, args.adapters, prompts, args.seeds, args.scales or config.run.merge_scales, args.videos
        )
    except (PromptError, PromptCacheError, AdapterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "chosen_scale": result["chosen_scale"],
                "reference": result["reference"]["reward"],
                "sweep": {str(r["scale"]): [r["reward"], r.get("ood")] for r in result["sweep"]},
            }
        )
    )
    print(f"report: {args.adapters / 'eval' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
