"""AR-CoPO on the toy world, in one process: does alignment happen?

    python -m bench.toy_alignment --json                 # all four variants, seed 0
    python -m bench.toy_alignment --json --seeds 0 1 2   # on-policy on three seeds too

Starting from the committed pre-trained toy generator (configs/toy.yaml), it runs, with fixed seeds:
- on_policy: fork / score / update the `on_policy` adapter on fresh groups (docs/method.md sections 2-3);
- semi: collect a fixed buffer of reference groups with pi_ref, train the `semi` adapter on batches
  drawn uniformly with replacement, pi_old = pi_ref, ratio clipping on (section 4);
- semi_no_clip: the same with clipping off (the paper's "off-policy" ablation);
- merged: W_base + dW_semi + s * dW_on (section 5), s swept over run.merge_scales and chosen by the
  dual-improvement rule (training reward up and out-of-domain score up).
Each reports the in-domain score (the training reward on the first run.eval_prompts training prompts)
and the out-of-domain score (run.out_of_domain: the toy `ood` on held-out prompts) before and after,
with the paired standard error of each change. The evaluation set, the scoring and the job's pieces
are the distributed job's own (cluster/inprocess.py, common/evaluation.py).

`fork_diversity` (first seed, base policy) says whether there is anything to learn from: per group of
G branches forked at pivots 0..L-1 in turn, the spread across branches (std over branches, mean over
elements) of the pivot chunk's initial noise and of the finished pivot chunk, and the std of the
group's rewards, overall and per pivot (`per_pivot`, groups cycle through the pivots). If the
finished chunks do not differ, the z-scored advantages are amplified noise.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from bench import load_toy_config, toy_bench_parser
from cluster.inprocess import InProcessRun
from common.evaluation import Scores
from common.model import adapters
from learner.merge import pick_merge_scale, unresolved_margins

if TYPE_CHECKING:
    from common.config import Config

NO_CLIP = 1e9  # a ratio clip so wide it never binds


@torch.no_grad()
def fork_diversity(run: InProcessRun, num_groups: int, seed: int) -> dict:
    """Branch spread and within-group reward std of the active policy (module docstring)."""
    rng, rows = random.Random(seed), []
    for i in range(num_groups):
        prompt = rng.choice(run.train_prompts)
        g = run.collect(prompt, rng, 0, adapters.ON_POLICY, pivot=i % run.config.sampler.num_chunks)
        rows.append(
            (
                g.pivot_inputs[:, 0].std(0).mean().item(),
                g.pivot_latents.clamp(-1.0, 1.0).std(0).mean().item(),
                g.rewards.std().item(),
                g.pivot,
            )
        )
    init, pivot, std, where = zip(*rows, strict=True)
    per_pivot = {}
    for k in sorted(set(where)):
        mine = [r for r in rows if r[3] == k]
        per_pivot[str(k)] = dict(
            groups=len(mine),
            pivot_chunk_spread=statistics.mean(r[1] for r in mine),
            reward_std=statistics.mean(r[2] for r in mine),
        )
    return dict(
        groups=num_groups,
        init_noise_spread=statistics.mean(init),
        pivot_chunk_spread=statistics.mean(pivot),
        reward_std=statistics.mean(std),
        reward_std_median=statistics.median(std),
        per_pivot=per_pivot,
    )


def _row(before: Scores, after: Scores) -> dict:
    """Before/after means with their standard errors, and the paired margins (after - before)."""
    d_in, e_in = after.in_domain.margin_over(before.in_domain)
    d_ood, e_ood = after.out_of_domain.margin_over(before.out_of_domain)
    return dict(
        reward_before=before.in_domain.mean,
        reward_after=after.in_domain.mean,
        ood_before=before.out_of_domain.mean,
        ood_after=after.out_of_domain.mean,
        reward_gain=d_in,
        reward_gain_stderr=e_in,
        ood_change=d_ood,
        ood_change_stderr=e_ood,
    )


def run(
    cfg: Config, seed: int, iterations: int, buffer_size: int, variants: list[str], diversity_groups: int = 0
) -> dict:
    torch.manual_seed(seed)
    toy = InProcessRun(cfg)
    per_iter = cfg.rollout.prompts_per_iteration
    results: dict[str, dict] = {}
    with adapters.reference_policy(toy.model):
        before = toy.evaluate()
        if diversity_groups:
            results["fork_diversity"] = fork_diversity(toy, diversity_groups, seed + 3)
    results["eval_videos"] = dict(in_domain=before.in_domain.n, out_of_domain=before.out_of_domain.n)

    def report(name, start, iters):
        results[name] = dict(**_row(before, toy.evaluate()), iterations=iters, seconds=time.perf_counter() - start)

    if "on_policy" in variants or "merged" in variants:
        start, rng = time.perf_counter(), random.Random(seed)

        def fresh(it):
            # The behaviour policy is the current adapter: strictly on-policy (max_staleness 0).
            adapters.use_adapter(toy.model, adapters.ON_POLICY)
            return [toy.collect(rng.choice(toy.train_prompts), rng, it, adapters.ON_POLICY) for _ in range(per_iter)]

        curve = toy.train(adapters.ON_POLICY, fresh, iterations, cfg.algorithm.clip_eps, seed)
        adapters.use_adapter(toy.model, adapters.ON_POLICY)
        report("on_policy", start, iterations)
        tenth = max(1, len(curve) // 10)
        results["on_policy"].update(
            group_reward_first=sum(curve[:tenth]) / tenth, group_reward_last=sum(curve[-tenth:]) / tenth
        )

    buffer = []
    if any(v in variants for v in ("semi", "semi_no_clip", "merged")):
        rng = random.Random(seed + 1)
        with adapters.reference_policy(toy.model):
            buffer = [
                toy.collect(rng.choice(toy.train_prompts), rng, 0, adapters.SEMI)
                for _ in tqdm(range(buffer_size), desc="reference buffer", leave=False)
            ]

    on_policy_state = adapters.adapter_state_dict(toy.model, adapters.ON_POLICY)
    for name, clip in (("semi_no_clip", NO_CLIP), ("semi", cfg.algorithm.clip_eps)):
        if name not in variants and not (name == "semi" and "merged" in variants):
            continue
        adapters.load_adapter_state_dict(toy.model, adapters.SEMI, toy.initial_adapters[adapters.SEMI])
        start, rng = time.perf_counter(), random.Random(seed + 2)
        # Which reward the semi adapter optimises is open in the paper: replay.semi_reward picks.
        reward_of = (
            (lambda g: g.rewards) if cfg.replay.semi_reward == "joint" else (lambda g: g.reward_components["ta"])
        )
        toy.train(
            adapters.SEMI,
            lambda it, rng=rng: [rng.choice(buffer) for _ in range(per_iter)],
            iterations,
            clip,
            seed,
            reward_of,
        )
        adapters.use_adapter(toy.model, adapters.SEMI)
        report(name, start, iterations)

    if "merged" in variants:
        # Sweep the merge scale and keep the largest that passes the dual-improvement rule; if none
        # passes, report the configured run.merge_scale and say so.
        adapters.load_adapter_state_dict(toy.model, adapters.ON_POLICY, on_policy_state)
        start = time.perf_counter()
        sweep = {}
        for scale in cfg.run.merge_scales:
            adapters.merge_adapters(toy.model, scale)
            sweep[scale] = toy.evaluate()
        chosen = pick_merge_scale(before, sweep)
        scale = chosen if chosen is not None else cfg.run.merge_scale
        adapters.merge_adapters(toy.model, scale)
        report("merged", start, 0)
        results["merged"].update(
            merge_scale=scale,
            dual_improvement_passed=chosen is not None,
            within_two_stderr=unresolved_margins(before, sweep[scale]) if scale in sweep else [],
            sweep={str(s): v.as_row() for s, v in sweep.items()},
        )
    return {k: results[k] for k in ["eval_videos", "fork_diversity", *variants] if k in results}


def main(argv: list[str] | None = None) -> int:
    parser = toy_bench_parser("toy_alignment", __doc__)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds; the first runs every variant, the others on-policy only",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["on_policy", "semi", "semi_no_clip", "merged"],
        choices=["on_policy", "semi", "semi_no_clip", "merged"],
        help="variants of the first seed",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="updates per variant, each on rollout.prompts_per_iteration groups (toy: 16, an "
        "on-policy update ~5 s on 2 cores); default: run.iterations (toy: 30)",
    )
    parser.add_argument("--buffer-size", type=int, default=None, help="default: replay.num_reference_groups")
    parser.add_argument(
        "--eval-prompts", type=int, default=None, help="in-domain evaluation prompts (default: run.eval_prompts)"
    )
    parser.add_argument(
        "--ood-prompts", type=int, default=None, help="held-out prompts (default: run.out_of_domain.num_prompts)"
    )
    parser.add_argument(
        "--eval-seeds", type=int, default=None, help="noise seeds an in-domain prompt (default: run.eval_seeds)"
    )
    parser.add_argument(
        "--ood-seeds", type=int, default=None, help="noise seeds a held-out prompt (default: run.out_of_domain.seeds)"
    )
    parser.add_argument(
        "--diversity-groups",
        type=int,
        default=12,
        help="forked groups of the base policy measured for fork_diversity (0: skip)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    # Dotted overrides go anywhere on the line: argparse alone would feed one that follows --seeds or
    # --variants (nargs="+") to that option and fail on it.
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_intermixed_args([a for a in argv if a not in overrides])
    # The evaluation set is the job's (common/evaluation.py); these options only resize it.
    sizes = {
        "run.eval_prompts": args.eval_prompts,
        "run.out_of_domain.num_prompts": args.ood_prompts,
        "run.eval_seeds": args.eval_seeds,
        "run.out_of_domain.seeds": args.ood_seeds,
    }
    overrides += [f"{k}={v}" for k, v in sizes.items() if v is not None]
    cfg = load_toy_config("toy_alignment", args.config, [*args.overrides, *overrides])
    if cfg is None:
        return 2
    buffer_size = args.buffer_size if args.buffer_size is not None else cfg.replay.num_reference_groups
    iterations = args.iterations if args.iterations is not None else cfg.run.iterations
    common = dict(iterations=iterations, buffer_size=buffer_size)
    result = run(cfg, args.seeds[0], variants=args.variants, diversity_groups=args.diversity_groups, **common)
    if len(args.seeds) > 1 and "on_policy" in result:
        gains = [result["on_policy"]["reward_after"] - result["on_policy"]["reward_before"]]
        for seed in args.seeds[1:]:
            r = run(cfg, seed, variants=["on_policy"], **common)["on_policy"]
            gains.append(r["reward_after"] - r["reward_before"])
        # "Beyond seed noise": every seed gains, and the mean gain is over twice its standard error
        # across seeds (a one-sided t of 2).
        mean, spread = statistics.mean(gains), statistics.stdev(gains)
        result["on_policy_seeds"] = dict(
            seeds=args.seeds,
            reward_gain=gains,
            mean_gain=mean,
            min_gain=min(gains),
            std_gain=spread,
            beyond_seed_noise=min(gains) > 0 and mean > 2 * spread / len(gains) ** 0.5,
        )
    if args.json:
        print(json.dumps(result))
    else:
        for name, r in result.items():
            print(name, json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
