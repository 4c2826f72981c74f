"""Does the generator obey docs/method.md section 1's premise, chunk by chunk?

    python -m bench.noise_sensitivity                       # the committed toy generator
    python -m bench.noise_sensitivity --json sampler.shift=0.5 model.diffusers_transformer=PATH

AR-CoPO explores through a chunk's INITIAL noise and shares the solver noises between a fork's
branches, because a distilled few-step generator is meant to be almost deterministic given its
initial noise: "replacing one solver noise barely changes the video, replacing a chunk's initial
noise changes it a lot". For each chunk c this measures both: G variants of one rollout that differ
only in chunk c's initial noise (perturbed as a fork does, e_i = sqrt(1 - sigma^2) e* + sigma d_i),
and G variants that differ only in chunk c's solver noises (replaced outright). It prints, per
chunk, the spread of the finished chunk (std over variants, mean over elements), the std of the
videos' training reward, and `initial_over_solver`, the ratio of the two spreads: above 1 the
premise holds; below 1 forks at that pivot have little to learn from, and the z-scored advantages of
their groups are mostly noise.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from typing import TYPE_CHECKING

import torch

from bench import load_toy_config, toy_bench_parser
from common.model.loading import load_policy, load_text_encoder
from common.model.noise import BranchNoise, NoisePlan, seeded_normal
from common.model.sampler import StreamingSampler
from common.toy.world import split_prompts
from rewards.combine import weighted_total
from rewards.toy import score

if TYPE_CHECKING:
    from common.config import Config


class SolverVaries:
    """The noise of `count` variants of one rollout that differ only in chunk `chunk`'s solver
    noises (replaced outright); everything else is the plan's, broadcast over the variants."""

    def __init__(self, plan: NoisePlan, chunk: int, count: int, seed: int):
        self.plan, self.chunk, self.batch_size, self.seed = plan, chunk, count, seed

    def initial(self, chunk, device=None, dtype=torch.float32):
        return self.plan.initial(chunk, device, dtype)

    def solver(self, chunk, step, device=None, dtype=torch.float32):
        if chunk != self.chunk:
            return self.plan.solver(chunk, step, device, dtype)
        variants = [
            seeded_normal(self.plan.chunk_shape, self.seed, "solver", chunk, step, i) for i in range(self.batch_size)
        ]
        return torch.stack(variants).to(device=device, dtype=dtype)

    def context(self, chunk, device=None, dtype=torch.float32):
        return self.plan.context(chunk, device, dtype)


def chunk_variants(plan: NoisePlan, chunk: int, kind: str, count: int, sigma: float, seed: int):
    """`count` variants of one rollout differing only in chunk `chunk`'s initial noise (a fork's
    branches, kind "initial") or only in its solver noises (kind "solver")."""
    if kind == "initial":
        return BranchNoise(plan, pivot=chunk, sigma=sigma, fork_seed=seed, branches=tuple(range(count)))
    if kind == "solver":
        return SolverVaries(plan, chunk, count, seed)
    raise ValueError(f"unknown kind {kind!r}: 'initial' or 'solver'")


@torch.no_grad()
def measure(cfg: Config, variants: int, rollouts: int, seed: int) -> dict:
    sampler = StreamingSampler.from_config(load_policy(cfg).eval(), cfg)
    encoder = load_text_encoder(cfg)
    prompts = [p.text for p in split_prompts(seed=0)[0]]
    terms = {t.name: t.weight for t in cfg.rewards.terms}
    f, rng, rows = sampler.frames_per_chunk, random.Random(seed), {}
    for chunk in range(sampler.num_chunks):
        row = {}
        for kind in ("initial", "solver"):
            spreads, reward_stds = [], []
            for _ in range(rollouts):
                prompt = rng.choice(prompts)
                noise = chunk_variants(
                    sampler.noise_plan(rng.randrange(2**31)),
                    chunk,
                    kind,
                    variants,
                    cfg.algorithm.fork_sigma,
                    rng.randrange(2**31),
                )
                latents = sampler.generate(encoder.encode([prompt]), noise)
                spreads.append(latents[:, :, chunk * f : (chunk + 1) * f].std(0).mean().item())
                # The unquantised frames, as this bench has always scored them.
                scores = score(latents.clamp(-1.0, 1.0), [prompt] * variants, list(terms))
                reward_stds.append(weighted_total(scores, terms).std().item())
            row[f"{kind}_spread"] = statistics.mean(spreads)
            row[f"{kind}_reward_std"] = statistics.mean(reward_stds)
        row["initial_over_solver"] = row["initial_spread"] / max(row["solver_spread"], 1e-12)
        rows[str(chunk)] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = toy_bench_parser("noise_sensitivity", __doc__)
    parser.add_argument("--variants", type=int, default=8, help="variants per rollout")
    parser.add_argument("--rollouts", type=int, default=6, help="rollouts (random training prompts) per chunk and kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_intermixed_args(argv)
    cfg = load_toy_config("noise_sensitivity", args.config, args.overrides)
    if cfg is None:
        return 2
    rows = measure(cfg, args.variants, args.rollouts, args.seed)
    if args.json:
        print(json.dumps(rows))
    else:
        print(
            f"{'chunk':>5} {'initial spread':>15} {'solver spread':>14} {'ratio':>7} {'reward std (init)':>18} "
            f"{'reward std (solver)':>20}"
        )
        for chunk, r in rows.items():
            print(
                f"{chunk:>5} {r['initial_spread']:>15.4f} {r['solver_spread']:>14.4f} {r['initial_over_solver']:>7.3f} "
                f"{r['initial_reward_std']:>18.4f} {r['solver_reward_std']:>20.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
