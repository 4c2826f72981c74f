"""How many groups does one AR-CoPO update need? How well independent batch gradients agree.

    python -m bench.gradient_noise                       # committed toy generator, 128 groups (~50 s)
    python -m bench.gradient_noise --json --groups 256 sampler.shift=1.0 model.diffusers_transformer=PATH

It forks and scores `--groups` groups with the base policy (pivots uniform, as training draws them),
takes each group's AR-CoPO gradient on the `on_policy` adapter (the first inner step, rho = 1, no
clipping of the norm), and for batch sizes n = 1, 2, 4, ... up to half the groups reports the mean
cosine between the summed gradients of two disjoint batches of n groups (over random splits), both
of the raw gradients (what an update sums) and of the gradients scaled to unit norm per group (the
direction each group votes for; raw sums are dominated by the few groups with large gradients, on
the toy the pivot-0 ones). If a group's gradient is a common signal g plus independent noise, that
cosine is n r / (1 + n r) with r = |g|^2 / E|noise|^2, so the bench also prints r and 1 / r, the
batch at which two batches agree at cosine 0.5. Far below that batch each optimiser step is mostly
noise, and Adam, which normalises the step size, takes it at full size anyway: the adapter
random-walks and the reward falls.
"""

from __future__ import annotations

import json
import random
import sys

import torch
from tqdm.auto import tqdm

from bench import load_toy_config, toy_bench_parser
from cluster.inprocess import InProcessRun
from common.model import adapters
from learner.update import UpdateSettings, arcopo_update


def batch_cosines(grads: torch.Tensor, sizes: list[int], splits: int, seed: int) -> dict[int, float]:
    """Mean cosine between the sums of two disjoint random batches of n rows of `grads` [N, D]."""
    rng = random.Random(seed)
    out = {}
    for n in sizes:
        if 2 * n > grads.shape[0]:
            raise ValueError(f"batch size {n}: two disjoint batches need {2 * n} groups, have {grads.shape[0]}")
        values = []
        for _ in range(splits):
            order = rng.sample(range(grads.shape[0]), 2 * n)
            a, b = grads[order[:n]].sum(0), grads[order[n:]].sum(0)
            values.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
        out[n] = sum(values) / len(values)
    return out


def signal_to_noise(n: int, cosine: float) -> float:
    """r in cos(n) = n r / (1 + n r): the per-group |signal|^2 / E|noise|^2."""
    cosine = min(max(cosine, 0.0), 0.999)
    return cosine / (n * (1 - cosine))


def group_gradients(toy: InProcessRun, num_groups: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """[num_groups, D] flattened gradients of the `on_policy` adapter, one row a group, and the pivots."""
    params = adapters.train_adapter(toy.model, adapters.ON_POLICY)
    adapters.use_adapter(toy.model, adapters.ON_POLICY)
    settings = UpdateSettings.from_config(toy.config)
    settings.inner_steps, settings.grad_clip = 1, float("inf")
    optimizer = torch.optim.SGD(params, lr=0.0)  # the update runs, the weights stay
    rng, rows, pivots = random.Random(seed), [], []
    for i in tqdm(range(num_groups), desc="group gradients"):
        with torch.no_grad():
            group = toy.collect(rng.choice(toy.train_prompts), rng, 0, adapters.ON_POLICY)
        arcopo_update(
            toy.sampler,
            [group],
            [group.rewards],
            [toy.policy.text([group.prompt])],
            params,
            optimizer,
            settings,
            torch.Generator().manual_seed(seed + i),
        )
        rows.append(torch.cat([p.grad.flatten() for p in params]))
        pivots.append(group.pivot)
    toy.model.requires_grad_(False)
    return torch.stack(rows), pivots


def main(argv: list[str] | None = None) -> int:
    parser = toy_bench_parser("gradient_noise", __doc__)
    parser.add_argument("--groups", type=int, default=128, help="groups forked, scored and differentiated")
    parser.add_argument("--splits", type=int, default=50, help="random disjoint splits averaged per batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_intermixed_args(argv)
    cfg = load_toy_config("gradient_noise", args.config, args.overrides)
    if cfg is None:
        return 2
    if args.groups < 2:
        print(f"--groups {args.groups}: two disjoint batches need at least 2 groups", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    toy = InProcessRun(cfg)
    grads, pivots = group_gradients(toy, args.groups, args.seed)
    sizes = [2**k for k in range(args.groups.bit_length()) if 2 ** (k + 1) <= args.groups]
    cosines = batch_cosines(grads, sizes, args.splits, args.seed)
    norms = grads.norm(dim=1, keepdim=True)
    unit = batch_cosines(grads / norms.clamp_min(1e-30), sizes, args.splits, args.seed)
    largest = sizes[-1]
    r = signal_to_noise(largest, cosines[largest])
    r_unit = signal_to_noise(largest, unit[largest])
    mean_norm = {str(p): norms[[i for i, q in enumerate(pivots) if q == p]].mean().item() for p in sorted(set(pivots))}
    result = dict(
        groups=args.groups,
        pivots={str(p): pivots.count(p) for p in sorted(set(pivots))},
        mean_grad_norm_by_pivot=mean_norm,
        batch_cosine={str(n): c for n, c in cosines.items()},
        signal_to_noise_per_group=r,
        batch_for_cosine_half=(1 / r) if r > 0 else None,
        unit_batch_cosine={str(n): c for n, c in unit.items()},
        unit_signal_to_noise_per_group=r_unit,
        unit_batch_for_cosine_half=(1 / r_unit) if r_unit > 0 else None,
        configured_batch=cfg.rollout.prompts_per_iteration,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print("mean gradient norm by pivot: " + ", ".join(f"{p}: {v:.2e}" for p, v in mean_norm.items()))
        print("cosine between the gradients of two independent batches (raw / unit norm per group):")
        for n in sizes:
            print(f"  batch {n:>4}: {cosines[n]:+.3f} / {unit[n]:+.3f}")
        for name, value in (("raw", r), ("unit", r_unit)):
            half = f"{1 / value:.0f}" if value > 0 else "inf"
            print(
                f"{name}: per-group signal/noise r = {value:.4f} (from batch {largest}); two batches agree at "
                f"cosine 0.5 from ~{half} groups"
            )
        print(f"configured rollout.prompts_per_iteration = {cfg.rollout.prompts_per_iteration}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
