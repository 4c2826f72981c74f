"""AR-CoPO on the toy world, in one process: does alignment happen?

    python -m bench.toy_alignment --json                 # all four variants, seed 0
    python -m bench.toy_alignment --json --seeds 0 1 2   # on-policy on three seeds too

Starting from the committed pre-trained toy generator (configs/toy.yaml), it runs, with fixed seeds:
- on_policy: fork / score / update the `on_policy` adapter on fresh groups (docs/method.md sections 2-3);
- semi: collect a fixed buffer of reference groups with pi_ref, train the `semi` adapter on batches
  drawn uniformly with replacement, pi_old = pi_ref, ratio clipping on (section 4);
- semi_no_clip: the same with clipping off (the paper's "off-policy" ablation);
- merged: W_base + dW_semi + s * dW_on (section 5), s swept over run.merge_scales and chosen by the
  dual-improvement rule (training reward up, out-of-domain score not down).
Each reports the training reward (the weighted sum of the trained terms) and the held-out
out-of-domain score before and after, on a fixed evaluation set of prompts and noise seeds.

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

from actors.rollout import collect_group
from bench import load_toy_config, toy_bench_parser
from common.model import adapters
from common.model.loading import load_policy
from common.model.sampler import StreamingSampler
from common.toy.world import ToyTextEncoder, split_prompts
from learner.merge import Scores, pick_merge_scale
from learner.update import UpdateSettings, arcopo_update
from rewards.toy import score

if TYPE_CHECKING:
    from common.config import Config

NO_CLIP = 1e9  # a ratio clip so wide it never binds


def unquantised_frames(latents: torch.Tensor) -> torch.Tensor:
    """The toy generator's frames [B, 3, F, H, W] in [-1, 1], not rounded to uint8 as the job's
    decoder (common/policy.pixels_as_video) rounds them: this bench has always scored them so, and
    its numbers stay comparable with docs/results.md's (rounding moves a pixel by up to half a grey level)."""
    return latents.clamp(-1.0, 1.0)


class ToyRun:
    """The toy world's policy, text encoder, rewards and evaluation set, shared by every variant."""

    def __init__(self, cfg: Config, eval_prompts: int, eval_seeds: int):
        self.cfg = cfg
        model = load_policy(cfg)
        lora = cfg.learner.lora
        adapters.add_adapters(model, lora.rank, lora.alpha, lora.target_modules)
        self.model = model
        self.base_state = {n: adapters.adapter_state_dict(model, n) for n in adapters.ADAPTERS}
        self.sampler = StreamingSampler.from_config(model, cfg)
        self.encoder = ToyTextEncoder(dim=cfg.model.transformer.text_dim)
        self.train_prompts, self.heldout_prompts = ([p.text for p in ps] for ps in split_prompts(seed=0))
        self.weights = {t.name: t.weight for t in cfg.rewards.terms}
        self.eval_set = [(p, 10_000 + s) for p in self.train_prompts[:eval_prompts] for s in range(eval_seeds)]

    def reset(self) -> None:
        for name, state in self.base_state.items():
            adapters.load_adapter_state_dict(self.model, name, {k: v.clone() for k, v in state.items()})

    def text(self, prompt: str) -> torch.Tensor:
        return self.encoder.encode([prompt])

    def reward_fn(self, videos, prompts):
        return score(videos, prompts, list(self.weights) + ["ood"])

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(mean training reward, mean out-of-domain score) of the active policy on the eval set."""
        prompts, seeds = [p for p, _ in self.eval_set], [s for _, s in self.eval_set]
        batch = self.cfg.run.eval_batch_size  # as the job evaluates: a batch's KV cache is its memory
        videos = torch.cat(
            [
                unquantised_frames(
                    self.sampler.generate(
                        self.encoder.encode(prompts[i : i + batch]), self.sampler.noise_plan(*seeds[i : i + batch])
                    )
                )
                for i in range(0, len(prompts), batch)
            ]
        )
        scores = self.reward_fn(videos, prompts)
        total = sum(w * scores[n] for n, w in self.weights.items())
        return total.mean().item(), scores["ood"].mean().item()

    @torch.no_grad()
    def fork_diversity(self, num_groups: int, seed: int) -> dict:
        """Branch spread and within-group reward std of the active policy (module docstring)."""
        rng, rows = random.Random(seed), []
        for i in range(num_groups):
            a = self.cfg.algorithm
            prompt = rng.choice(self.train_prompts)
            g = collect_group(
                self.sampler,
                self.text(prompt),
                prompt,
                pivot=i % self.cfg.sampler.num_chunks,
                group_size=a.group_size,
                sigma=a.fork_sigma,
                plan_seed=rng.randrange(2**31),
                fork_seed=rng.randrange(2**31),
                decode=unquantised_frames,
                reward_fn=self.reward_fn,
                weights=self.weights,
                policy_version=0,
                adapter=adapters.ON_POLICY,
            )
            rows.append(
                (
                    g.pivot_inputs[:, 0].std(0).mean().item(),
                    unquantised_frames(g.pivot_latents).std(0).mean().item(),
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

    def collect(self, prompt: str, rng: random.Random, version: int, adapter: str):
        a = self.cfg.algorithm
        return collect_group(
            self.sampler,
            self.text(prompt),
            prompt,
            pivot=rng.randrange(self.cfg.sampler.num_chunks),
            group_size=a.group_size,
            sigma=a.fork_sigma,
            plan_seed=rng.randrange(2**31),
            fork_seed=rng.randrange(2**31),
            decode=unquantised_frames,
            reward_fn=self.reward_fn,
            weights=self.weights,
            policy_version=version,
            adapter=adapter,
        )

    def train(
        self,
        adapter: str,
        groups_for_iteration,
        iterations: int,
        clip_eps: float,
        seed: int,
        reward_of=lambda g: g.rewards,
    ) -> list[float]:
        """Train `adapter`; returns the mean group reward of each iteration's batch (the learning curve
        of on-policy training; for the fixed buffer it only shows what was sampled)."""
        settings = UpdateSettings.from_config(self.cfg)
        settings.clip_eps = clip_eps
        params = adapters.train_adapter(self.model, adapter)
        optimizer = torch.optim.AdamW(params, lr=self.cfg.learner.lr, weight_decay=self.cfg.learner.weight_decay)
        generator = torch.Generator().manual_seed(seed)
        curve = []
        for it in tqdm(range(iterations), desc=adapter, leave=False):
            groups = groups_for_iteration(it)
            curve.append(sum(reward_of(g).mean().item() for g in groups) / len(groups))
            arcopo_update(
                self.sampler,
                groups,
                [reward_of(g) for g in groups],
                [self.text(g.prompt) for g in groups],
                params,
                optimizer,
                settings,
                generator,
            )
        self.model.requires_grad_(False)
        return curve


def run(
    cfg: Config,
    seed: int,
    iterations: int,
    buffer_size: int,
    eval_prompts: int,
    eval_seeds: int,
    variants: list[str],
    diversity_groups: int = 0,
) -> dict:
    torch.manual_seed(seed)
    toy = ToyRun(cfg, eval_prompts, eval_seeds)
    per_iter = cfg.rollout.prompts_per_iteration
    results: dict[str, dict] = {}
    with adapters.reference_policy(toy.model):
        before = toy.evaluate()
        if diversity_groups:
            results["fork_diversity"] = toy.fork_diversity(diversity_groups, seed + 3)

    def report(name, start, iters):
        after = toy.evaluate()
        results[name] = dict(
            reward_before=before[0],
            reward_after=after[0],
            ood_before=before[1],
            ood_after=after[1],
            iterations=iters,
            seconds=time.perf_counter() - start,
        )

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
        adapters.load_adapter_state_dict(toy.model, adapters.SEMI, toy.base_state[adapters.SEMI])
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
            sweep[scale] = Scores(*toy.evaluate())
        chosen = pick_merge_scale(Scores(*before), sweep)
        scale = chosen if chosen is not None else cfg.run.merge_scale
        adapters.merge_adapters(toy.model, scale)
        report("merged", start, 0)
        results["merged"].update(
            merge_scale=scale,
            dual_improvement_passed=chosen is not None,
            sweep={str(s): [v.in_domain, v.out_of_domain] for s, v in sweep.items()},
        )
    return {k: results[k] for k in ["fork_diversity", *variants] if k in results}


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
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--eval-seeds", type=int, default=2)
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
    cfg = load_toy_config("toy_alignment", args.config, [*args.overrides, *overrides])
    if cfg is None:
        return 2
    buffer_size = args.buffer_size if args.buffer_size is not None else cfg.replay.num_reference_groups
    iterations = args.iterations if args.iterations is not None else cfg.run.iterations
    common = dict(
        iterations=iterations, buffer_size=buffer_size, eval_prompts=args.eval_prompts, eval_seeds=args.eval_seeds
    )
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
