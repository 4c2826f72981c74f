"""Evaluate a run's adapters: in-domain and out-of-domain scores with their standard errors per
policy and merge scale, the dual-improvement rule, and a report you can read and watch.

    python -m cluster.evaluate --config configs/toy.yaml --adapters runs/demo
    python -m cluster.evaluate --config configs/toy.yaml --adapters runs/demo --prompts my_prompts.txt \\
        --scales 0 0.5 1 --seeds 4

Writes <adapters>/eval/: report.html (videos side by side, tables, plot), report.md (the tables as
text), scores.json, merge_sweep.png (both scores against the merge scale) and
videos/<policy>_<i>.mp4 for the first prompts. In-process (no Ray): the tool for checking a finished
run on one machine. It scores exactly as the job does (common/evaluation.py: the same evaluation
set, noise seeds and weighted totals), so on the run's own config it repeats the run's numbers.

The merged policy is W_base + dW_semi + s dW_on (docs/method.md section 5); `reference` is the base
alone. The chosen scale is the largest whose in-domain AND out-of-domain scores both beat the base
(learner/merge.py); a margin within two standard errors is flagged as unresolved.
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
    from common.evaluation import Scores

SAMPLE_SEED = 7


def plot_sweep(sweep: dict[str, dict], base: dict, out: Path) -> None:
    """Both scores against the merge scale, with 2-stderr bars and the base as dashed lines. `sweep`
    maps each scale to a score row ({"in_domain": [mean, stderr], "out_of_domain": [...]}, as
    Scores.as_row gives it), `base` is the reference policy's row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(sweep, key=float)
    fig, ax = plt.subplots(figsize=(6, 3.6))

    def series(axis, name: str, colour: str, marker: str, label: str) -> None:
        means = [sweep[s][name][0] for s in scales]
        errs = [2 * sweep[s][name][1] for s in scales]
        axis.errorbar(
            [float(s) for s in scales], means, yerr=errs, fmt=marker + "-", color=colour, capsize=3, label=label
        )
        axis.axhline(base[name][0], color=colour, ls="--", lw=0.8)

    series(ax, "in_domain", "C0", "o", "in-domain reward (± 2 s.e.)")
    ax.set(xlabel="merge scale s (W_base + dW_semi + s dW_on)", ylabel="in-domain reward", title="merge sweep")
    ax.legend(loc="upper left", fontsize=7)
    if base["out_of_domain"][0] == base["out_of_domain"][0]:  # not NaN
        ax2 = ax.twinx()
        series(ax2, "out_of_domain", "C1", "s", "out-of-domain score (± 2 s.e.)")
        ax2.set_ylabel("out-of-domain score")
        ax2.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def evaluate(
    config: Config, run_dir: Path, prompts: list[str], heldout: list[str], scales: list[float], videos: int
) -> dict:
    """Score the reference, each adapter alone and the merge sweep on EvalSet(prompts, heldout)."""
    from cluster.report import write_report
    from common.durable import write_bytes_atomic
    from common.evaluation import EvalSet, score_policy
    from common.model import adapters
    from common.model.policy import Policy
    from common.model.prompt_cache import DEFAULT_NAME, with_cache_path
    from common.video import encode_mp4
    from learner.merge import pick_merge_scale, unresolved_margins
    from rewards.combine import policy_scores
    from rewards.server import build_reward_models, score_batch

    if config.model.prompt_cache is None and (run_dir / DEFAULT_NAME).is_file():
        # The run's own prompt embeddings: the text encoder loads only for prompts the run never saw.
        config = with_cache_path(config, run_dir)
    policy = Policy.from_config(config, role="rollout")
    for name in adapters.ADAPTERS:
        adapters.load_adapter(policy.model, run_dir / "adapters" / name, name)
    models = build_reward_models(config)
    eval_set = EvalSet.from_config(config, prompts, heldout)
    out = run_dir / "eval"

    def measure(mode: str, scale: float = 1.0) -> Scores:
        policy.set_mode(mode, scale)
        per_video = score_policy(
            policy,
            eval_set.prompts,
            eval_set.seeds,
            lambda frames, p: score_batch(models, frames, p, fps=config.rewards.video_fps),
            config.run.eval_batch_size,
        )
        return policy_scores(eval_set, per_video, config)[0]

    def sample(tag: str, mode: str, scale: float = 1.0) -> list[str]:
        policy.set_mode(mode, scale)
        shown = prompts[:videos]
        batches = policy.videos(shown, [SAMPLE_SEED] * len(shown), config.run.eval_batch_size)
        paths = []
        for i, f in enumerate(f for _, batch in batches for f in batch):
            data = encode_mp4(f, fps=8.0, upscale=max(1, 128 // f.shape[1]))
            paths.append(str(write_bytes_atomic(out / "videos" / f"{tag}_{i}.mp4", data).relative_to(out)))
        return paths

    base = measure("reference")
    sweep = {scale: measure("merged", scale) for scale in tqdm(scales, desc="merge sweep")}
    singles = {name: measure(name) for name in adapters.ADAPTERS}
    pick = pick_merge_scale(base, sweep)
    unresolved = unresolved_margins(base, sweep[pick]) if pick is not None else []
    if pick is not None:
        after_tag, after_label = f"merged_{pick:g}", f"merged, s = {pick:g}"
        clips = {"reference": sample("reference", "reference"), after_tag: sample(after_tag, "merged", pick)}
        verdict = (
            f"Chosen merge scale {pick:g}: the largest whose in-domain and out-of-domain scores both beat the base."
        )
    else:
        after_tag, after_label = adapters.ON_POLICY, "on-policy adapter alone"
        clips = {"reference": sample("reference", "reference"), after_tag: sample(after_tag, adapters.ON_POLICY)}
        verdict = "No merge scale passes the dual-improvement rule (in-domain and out-of-domain scores both up)."
    warnings = [f"At s = {pick:g} the {m}: within two standard errors, not resolved by this set." for m in unresolved]

    rows = [{"policy": "reference (base)", **base.as_row()}]
    rows += [{"policy": f"{name} adapter alone", **s.as_row()} for name, s in singles.items()]
    rows += [{"policy": f"merged, s = {scale:g}", **s.as_row()} for scale, s in sweep.items()]
    result = {
        "eval_videos": {"in_domain": len(eval_set.in_domain), "out_of_domain": len(eval_set.out_of_domain)},
        "scores": rows,
        "sweep": {str(scale): s.as_row() for scale, s in sweep.items()},
        "chosen_scale": pick,
        "dual_improvement_passed": pick is not None,
        "within_two_stderr": unresolved,
        "videos": clips,
    }
    write_bytes_atomic(out / "scores.json", (json.dumps(result, indent=2) + "\n").encode())
    plot_sweep(result["sweep"], base.as_row(), out / "merge_sweep.png")
    names = score_names(config)
    lines = [
        f"# Evaluation of {run_dir.name}",
        "",
        f"{len(eval_set.in_domain)} in-domain videos, {len(eval_set.out_of_domain)} out-of-domain videos; "
        "mean ± standard error over videos.",
        "",
        f"| policy | {names['in_domain']} | {names['out_of_domain']} |",
        "| --- | --- | --- |",
        *(f"| {r['policy']} | {_pm(r['in_domain'])} | {_pm(r['out_of_domain'])} |" for r in rows),
        "",
        f"**{verdict}** (dual-improvement rule)",
        *(f"- {w}" for w in warnings),
        "",
        "![merge sweep](merge_sweep.png)",
    ]
    write_bytes_atomic(out / "report.md", ("\n".join(lines) + "\n").encode())
    write_report(
        out,
        {
            "title": f"Evaluation of {run_dir.name}",
            "samples": [
                {"prompt": p, "before": b, "after": a}
                for p, b, a in zip(prompts, clips["reference"], clips[after_tag], strict=False)
            ],
            "before_label": "reference (base)",
            "after_label": after_label,
            "scores": rows,
            "score_names": names,
            "verdict": verdict,
            "warnings": warnings,
            "plots": [{"title": "merge sweep", "path": "merge_sweep.png"}],
        },
    )
    return result


def score_names(config: Config) -> dict[str, str]:
    """Column headings of a score table: what each score is made of."""
    terms = " + ".join(f"{t.weight:g} {t.name}" for t in config.rewards.terms)
    ood = config.run.out_of_domain
    ood_terms = " + ".join(f"{t.weight:g} {t.name}" for t in ood.terms) if ood else "none"
    return {"in_domain": f"in-domain ({terms})", "out_of_domain": f"out-of-domain ({ood_terms}, held-out prompts)"}


def _pm(pair: list[float]) -> str:
    mean, err = pair
    return f"{mean:.4f} ± {err:.4f}" if err == err else f"{mean:.4f}"


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
        help="in-domain prompt file, one per line (default: the run's, rollout.prompts or the toy world's)",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="noise seeds per prompt (default: run.eval_seeds, as the run)"
    )
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

    overrides = [*args.overrides, *([f"run.eval_seeds={args.seeds}"] if args.seeds is not None else [])]
    config = load_config_for_cli(args.config, overrides)
    if config is None:
        return 2
    if config.run.out_of_domain is None:
        print(
            "error: run.out_of_domain: unset; choosing a merge scale needs an out-of-domain score "
            "(held-out prompts and reward terms the run does not train on)",
            file=sys.stderr,
        )
        return 2
    try:
        # --prompts replaces rollout.prompts; read_prompt_file names that file if it is missing.
        preflight(config, ignore=("rollout.prompts",) if args.prompts is not None else ())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        ood_file = config.run.out_of_domain.prompts
        if args.prompts is None:
            prompts, heldout = load_prompts(config)
        else:
            prompts = read_prompt_file(args.prompts, key="--prompts")
            heldout = read_prompt_file(ood_file, "run.out_of_domain.prompts") if ood_file else load_prompts(config)[1]
        shared = set(prompts) & set(heldout)
        if shared:
            raise PromptError(
                f"--prompts shares {len(shared)} prompt(s) with the held-out prompts, e.g. {min(shared)!r}"
            )
        result = evaluate(config, args.adapters, prompts, heldout, args.scales or config.run.merge_scales, args.videos)
    except (PromptError, PromptCacheError, AdapterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("chosen_scale", "within_two_stderr", "sweep")}))
    print(f"report: {args.adapters / 'eval' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
