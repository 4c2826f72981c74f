"""The one evaluation (common/evaluation.py): which videos, and how their scores become Scores."""

from __future__ import annotations

import pytest
import torch

from common.config import load_config
from common.evaluation import EVAL_SEED_BASE, EvalSet, score_policy
from rewards.combine import policy_scores

TOY = "configs/toy.yaml"
TRAIN = ["t0", "t1", "t2", "t3"]
HELDOUT = ["h0", "h1", "h2"]


def test_the_set_is_training_prompts_then_held_out_prompts_with_fixed_seeds():
    sizes = [
        "run.eval_prompts=2",
        "run.eval_seeds=2",
        "run.out_of_domain.num_prompts=2",
        "run.out_of_domain.seeds=null",
    ]
    cfg = load_config(TOY, sizes)
    s = EvalSet.from_config(cfg, TRAIN, HELDOUT)
    base = EVAL_SEED_BASE
    assert s.in_domain == (("t0", base), ("t0", base + 1), ("t1", base), ("t1", base + 1))
    assert s.out_of_domain == (("h0", base), ("h0", base + 1), ("h1", base), ("h1", base + 1))
    assert s.prompts == ["t0", "t0", "t1", "t1", "h0", "h0", "h1", "h1"]
    # A few held-out prompts can take more noise seeds than the in-domain ones.
    more = EvalSet.from_config(load_config(TOY, ["run.eval_seeds=1", "run.out_of_domain.seeds=3"]), TRAIN, HELDOUT)
    assert len(more.in_domain) == 4 and len(more.out_of_domain) == 3 * 3
    assert {seed for _, seed in more.out_of_domain} == {base, base + 1, base + 2}
    with pytest.raises(ValueError, match="no held-out prompts"):
        EvalSet.from_config(cfg, TRAIN, [])
    # Without an out-of-domain score (a run without merge) the set is the in-domain part only.
    plain = load_config(TOY, ["run.out_of_domain=null", "run.phases=[on_policy]", "run.eval_prompts=1"])
    assert EvalSet.from_config(plain, TRAIN, HELDOUT).out_of_domain == ()


def test_scores_weight_the_training_terms_in_domain_and_the_held_out_terms_out_of_domain():
    cfg = load_config(
        TOY,
        [
            "run.eval_prompts=2",
            "run.eval_seeds=1",
            "run.out_of_domain.num_prompts=1",
            "run.out_of_domain.seeds=1",
            "rewards.terms=[{name: vq, weight: 2}, {name: ta}]",
        ],
    )
    s = EvalSet.from_config(cfg, TRAIN, HELDOUT)
    per_video = {"vq": [0.1, 0.2, 0.9], "ta": [1.0, 3.0, 0.5], "ood": [7.0, 8.0, 0.25]}
    scores, parts = policy_scores(s, per_video, cfg)
    assert scores.in_domain.values == pytest.approx((2 * 0.1 + 1.0, 2 * 0.2 + 3.0))
    assert scores.out_of_domain.values == (0.25,)  # ood on the held-out video only, never the in-domain ones
    assert parts["vq"] == pytest.approx(0.15) and parts["heldout/ood"] == 0.25
    with pytest.raises(ValueError, match="per-video scores for 3 videos"):
        policy_scores(s, {"vq": [0.1], "ta": [1.0], "ood": [7.0]}, cfg)


def test_score_policy_scores_each_batch_in_order():
    class FakePolicy:
        def videos(self, prompts, seeds, batch_size):
            for i in range(0, len(prompts), batch_size):
                yield prompts[i : i + batch_size], torch.tensor(seeds[i : i + batch_size])

    seen = []

    def score(frames, prompts):
        seen.append(list(prompts))
        return {"x": frames.float() / 10}

    out = score_policy(FakePolicy(), ["a", "b", "c"], [1, 2, 3], score, batch_size=2)
    assert out == {"x": pytest.approx([0.1, 0.2, 0.3])} and seen == [["a", "b"], ["c"]]
