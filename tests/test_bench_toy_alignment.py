"""The toy alignment bench runs end to end (tiny budget) and prints the object the issue names.
Whether alignment happens is the bench's own job at full budget; no timing or gain is asserted here."""

from __future__ import annotations

import json

from bench.toy_alignment import main


def test_toy_alignment_bench_smoke(capsys):
    args = ["--json", "--seeds", "0", "1", "--iterations", "1", "--buffer-size", "2", "--eval-prompts", "2", "--eval-seeds", "1",
            "--diversity-groups", "1",
            "rollout.prompts_per_iteration=1",
            "algorithm.group_size=4", "algorithm.num_anchors=2", "run.merge_scales=[0.0, 1.0]"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["fork_diversity", "on_policy", "semi", "semi_no_clip", "merged", "on_policy_seeds"]
    seeds = result.pop("on_policy_seeds")
    assert seeds["seeds"] == [0, 1] and len(seeds["reward_gain"]) == 2
    assert seeds["reward_gain"][0] == result["on_policy"]["reward_after"] - result["on_policy"]["reward_before"]
    assert seeds["beyond_seed_noise"] == (min(seeds["reward_gain"]) > 0
                                          and seeds["mean_gain"] > 2 * seeds["std_gain"] / 2 ** 0.5)
    diversity = result.pop("fork_diversity")
    assert diversity["groups"] == 1 and diversity["init_noise_spread"] > 0.3  # sigma 0.5 neighbours
    for key in ("pivot_chunk_spread", "reward_std", "reward_std_median"):
        assert diversity[key] >= 0
    assert list(diversity["per_pivot"]) == ["0"] and diversity["per_pivot"]["0"]["groups"] == 1
    for variant in result.values():
        for key in ("reward_before", "reward_after", "ood_before", "ood_after", "iterations", "seconds"):
            assert key in variant
    assert result["on_policy"]["iterations"] == 1
    assert set(result["merged"]["sweep"]) == {"0.0", "1.0"}
    # Everything starts from the same base policy and evaluation set.
    assert len({v["reward_before"] for v in result.values()}) == 1
