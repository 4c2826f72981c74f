"""`python -m cluster.evaluate` on a run folder: sweep, dual-improvement rule, report, videos."""

from __future__ import annotations

import json

import torch

from cluster.evaluate import main
from common import adapters
from common.config import load_config
from common.policy import Policy


def test_evaluate_writes_a_report_with_the_sweep_and_videos(tmp_path):
    overrides = ["model.diffusers_transformer=null", "learner.lora.rank=2"]
    cfg = load_config("configs/toy.yaml", overrides)
    policy = Policy.from_config(cfg)
    for name in adapters.ADAPTERS:  # adapters that really change the policy
        for p in adapters.train_adapter(policy.model, name):
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        adapters.save_adapter(policy.model, name, tmp_path / "adapters" / name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left on a black background\na green square moving up on a gray background\n")

    code = main(["--adapters", str(tmp_path), "--prompts", str(prompts), "--seeds", "1", "--scales", "0", "1",
                 "--videos", "1", *overrides])
    assert code == 0
    out = tmp_path / "eval"
    scores = json.loads((out / "scores.json").read_text())
    assert [r["scale"] for r in scores["sweep"]] == [0.0, 1.0]
    # s = 0 is the semi adapter alone; s = 1 differs from it (the on-policy adapter is not zero).
    assert abs(scores["sweep"][0]["reward"] - scores["adapters"]["semi"]["reward"]) < 1e-6
    assert scores["sweep"][1]["reward"] != scores["sweep"][0]["reward"]
    report = (out / "report.md").read_text()
    assert "merged, s = 1" in report and "dual-improvement" in report
    assert (out / "merge_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "videos" / "reference_0.mp4").stat().st_size > 0


def test_evaluate_names_a_missing_adapter(tmp_path, capsys):
    assert main(["--adapters", str(tmp_path), "model.diffusers_transformer=null"]) == 2
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().err
