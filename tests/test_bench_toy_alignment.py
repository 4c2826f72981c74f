"""The toy alignment bench runs end to end (tiny budget), and what it reports is what it claims to
measure: the forks' spread, the merge sweep and its dual-improvement choice, the seed statistics. At
that budget one update moves the eval reward by ~1e-3 either way, so the gain is asserted by a
`slow` run of 10 on-policy updates; beyond seed noise is the bench's own job at full budget (docs/results.md)."""

from __future__ import annotations

import contextlib
import io
import json
import statistics

import pytest

from bench.toy_alignment import main
from learner.merge import Scores, dual_improvement, pick_merge_scale

SMOKE = [
    "--json",
    "--seeds",
    "0",
    "1",
    "--iterations",
    "1",
    "--buffer-size",
    "2",
    "--eval-prompts",
    "2",
    "--ood-prompts",
    "2",
    "--eval-seeds",
    "1",
    "--diversity-groups",
    "1",
    "rollout.prompts_per_iteration=1",
    "algorithm.group_size=4",
    "algorithm.num_anchors=2",
    "run.merge_scales=[0.0, 0.5, 1.0]",
    "run.merge_scale=0.5",
    "run.out_of_domain.seeds=1",
]


@pytest.fixture(scope="module")
def smoke() -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(SMOKE) == 0
    return json.loads(out.getvalue())


def test_toy_alignment_bench_reports_every_variant(smoke):
    result = dict(smoke)
    assert list(result) == [
        "eval_videos",
        "fork_diversity",
        "on_policy",
        "semi",
        "semi_no_clip",
        "merged",
        "on_policy_seeds",
    ]
    # The job's evaluation set (common/evaluation.py), resized: 2 training and 2 held-out prompts, 1 seed.
    assert result["eval_videos"] == {"in_domain": 2, "out_of_domain": 2}
    for name in ("on_policy", "semi", "semi_no_clip", "merged"):
        variant = result[name]
        for key in ("reward_before", "reward_after", "ood_before", "ood_after", "iterations", "seconds"):
            assert key in variant
        # Each change comes with its paired standard error over the evaluation videos.
        assert variant["reward_gain"] == pytest.approx(variant["reward_after"] - variant["reward_before"], abs=1e-6)
        assert variant["ood_change"] == pytest.approx(variant["ood_after"] - variant["ood_before"], abs=1e-6)
        assert variant["reward_gain_stderr"] > 0 and variant["ood_change_stderr"] > 0
    assert result["on_policy"]["iterations"] == 1 and result["merged"]["iterations"] == 0
    # Everything starts from the same base policy and evaluation set.
    assert len({result[n]["reward_before"] for n in ("on_policy", "semi", "semi_no_clip", "merged")}) == 1


def test_fork_diversity_measures_the_forks(smoke):
    diversity = smoke["fork_diversity"]
    assert diversity["groups"] == 1 and list(diversity["per_pivot"]) == ["0"]
    # Branch initial noises e_i = sqrt(1 - sigma^2) e* + sigma d_i differ by sigma d_i: their std over
    # 4 branches is sigma = 0.5 times c4 ~ 0.92 (measured 0.461). A fork that ignored sigma, or
    # squared it, or shared one noise, lands far from it.
    assert abs(diversity["init_noise_spread"] - 0.5 * 0.92) < 0.06, diversity
    # The committed generator's pivot-0 forks end visibly apart (docs/results.md: ~0.05 per pixel, reward std
    # ~0.05; measured here 0.053 and 0.042). Measuring a shared chunk, or the same branch twice, gives 0.
    assert diversity["pivot_chunk_spread"] > 0.02 and diversity["reward_std"] > 0.01, diversity
    # One group: the pivot-0 row, the mean and the median are that group's figures.
    row = diversity["per_pivot"]["0"]
    assert row == {
        "groups": 1,
        "pivot_chunk_spread": diversity["pivot_chunk_spread"],
        "reward_std": diversity["reward_std"],
    }
    assert diversity["reward_std_median"] == diversity["reward_std"]


def test_the_merge_sweep_and_its_choice(smoke):
    merged, semi = smoke["merged"], smoke["semi"]
    sweep = {float(s): Scores(v["in_domain"][0], v["out_of_domain"][0]) for s, v in merged["sweep"].items()}
    assert sorted(sweep) == [0.0, 0.5, 1.0]
    # s = 0 is W_base + dW_semi: the semi adapter alone, evaluated on the same set and noise.
    assert sweep[0.0].in_domain.mean == pytest.approx(semi["reward_after"], abs=1e-6)
    assert sweep[0.0].out_of_domain.mean == pytest.approx(semi["ood_after"], abs=1e-6)
    # The choice is the dual-improvement rule over the reported sweep (else the configured 0.5), and
    # the merged model reported is the sweep's point at that scale.
    base = Scores(merged["reward_before"], merged["ood_before"])
    chosen = pick_merge_scale(base, sweep)
    assert merged["dual_improvement_passed"] == (chosen is not None)
    assert merged["dual_improvement_passed"] == any(dual_improvement(base, v) for v in sweep.values())
    assert merged["merge_scale"] == (chosen if chosen is not None else 0.5)
    point = sweep[merged["merge_scale"]]
    assert merged["reward_after"] == pytest.approx(point.in_domain.mean, abs=1e-6)
    assert merged["ood_after"] == pytest.approx(point.out_of_domain.mean, abs=1e-6)
    # Two videos cannot resolve a change of this size: the bench says so.
    assert merged["within_two_stderr"], merged


def test_the_seed_statistics(smoke):
    seeds = smoke["on_policy_seeds"]
    gains = seeds["reward_gain"]
    assert seeds["seeds"] == [0, 1] and len(gains) == 2
    assert gains[0] == smoke["on_policy"]["reward_after"] - smoke["on_policy"]["reward_before"]
    assert seeds["mean_gain"] == pytest.approx(statistics.mean(gains))
    assert seeds["min_gain"] == min(gains) and seeds["std_gain"] == pytest.approx(statistics.stdev(gains))
    # "Beyond seed noise": every seed gains and the mean is over two standard errors.
    assert seeds["beyond_seed_noise"] == (min(gains) > 0 and seeds["mean_gain"] > 2 * seeds["std_gain"] / 2**0.5)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~4 min idle; a loaded machine took over the suite's 600 s
def test_on_policy_training_raises_the_eval_reward(capsys):
    # 10 on-policy updates of 16 groups from the committed generator (~3.5 min on 2 cores; the
    # bench's full budget is 30): on the toy config's 512 in-domain evaluation videos the reward rises
    # from 1.005 to 1.038, +0.0326 with a paired standard error of 0.0013 (measured 2026-11-30), and
    # so does the reward of the groups trained on (0.971 -> 1.040). Here on the first 256 of them
    # (and 36 held-out videos), to keep the test short. The bench is seeded; the margin covers
    # thread-count rounding, not a second seed.
    sizes = ["--eval-prompts", "64", "--eval-seeds", "4", "--ood-seeds", "1"]
    assert main(["--json", "--variants", "on_policy", "--iterations", "10", "--diversity-groups", "0", *sizes]) == 0
    run = json.loads(capsys.readouterr().out)["on_policy"]
    assert run["reward_after"] - run["reward_before"] > 0.01, run
    assert run["reward_gain"] > 4 * run["reward_gain_stderr"], run  # resolved by the evaluation set
    assert run["group_reward_last"] > run["group_reward_first"], run
