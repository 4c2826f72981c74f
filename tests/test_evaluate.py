"""`python -m cluster.evaluate` on a run folder: sweep, dual-improvement rule, report, videos."""

from __future__ import annotations

import json

import torch

from cluster.evaluate import main
from common.config import load_config
from common.model import adapters
from common.model.policy import Policy
from learner.merge import Scores, pick_merge_scale


def test_evaluate_writes_a_report_with_the_sweep_and_videos(tmp_path):
    overrides = ["model.diffusers_transformer=null", "learner.lora.rank=2"]
    cfg = load_config("configs/toy.yaml", overrides)
    policy = Policy.from_config(cfg)
    for seed, name in enumerate(adapters.ADAPTERS, 1):  # two different adapters that really change the policy
        for p in adapters.train_adapter(policy.model, name):
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        adapters.save_adapter(policy.model, name, tmp_path / "adapters" / name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a red circle moving left on a black background\na green square moving up on a gray background\n"
    )

    code = main(
        [
            "--adapters",
            str(tmp_path),
            "--prompts",
            str(prompts),
            "--seeds",
            "1",
            "--scales",
            "0",
            "1",
            "--videos",
            "1",
            *overrides,
        ]
    )
    assert code == 0
    out = tmp_path / "eval"
    scores = json.loads((out / "scores.json").read_text())
    assert [r["scale"] for r in scores["sweep"]] == [0.0, 1.0]
    # The two adapters move the policy apart (measured: their rewards differ by 6e-3, s = 0 and 1 by
    # 8e-3), so the sweep's points are told apart by more than rounding: s = 0 is the semi adapter
    # alone (not the on-policy one: the scale applies to dW_on), and s = 1 adds the on-policy adapter.
    semi, on_policy = scores["adapters"]["semi"]["reward"], scores["adapters"]["on_policy"]["reward"]
    assert abs(semi - on_policy) > 1e-3, (semi, on_policy)
    assert abs(scores["sweep"][0]["reward"] - semi) < 1e-6
    assert abs(scores["sweep"][1]["reward"] - scores["sweep"][0]["reward"]) > 1e-3, scores["sweep"]
    # The choice is the dual-improvement rule over the reported sweep.
    base = Scores(scores["reference"]["reward"], scores["reference"]["ood"])
    chosen = pick_merge_scale(base, {r["scale"]: Scores(r["reward"], r["ood"]) for r in scores["sweep"]})
    assert scores["chosen_scale"] == chosen and scores["dual_improvement_passed"] == (chosen is not None)
    report = (out / "report.md").read_text()
    assert "merged, s = 1" in report and "dual-improvement" in report
    assert (out / "merge_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "videos" / "reference_0.mp4").stat().st_size > 0


def test_evaluate_names_a_missing_adapter(tmp_path, capsys):
    assert main(["--adapters", str(tmp_path), "model.diffusers_transformer=null"]) == 2
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().err
