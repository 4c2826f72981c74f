"""`python -m cluster.evaluate` on a run folder: sweep, dual-improvement rule, report, videos."""

from __future__ import annotations

import json

import torch

from cluster.evaluate import main
from cluster.inprocess import InProcessRun
from common.config import load_config
from common.model import adapters
from common.model.policy import Policy
from learner.merge import Scores, pick_merge_scale

OVERRIDES = [
    "model.diffusers_transformer=null",
    "learner.lora.rank=2",
    "run.eval_prompts=2",
    "run.eval_seeds=2",
    "run.out_of_domain.num_prompts=2",
    "run.out_of_domain.seeds=1",
]


def test_evaluate_writes_a_report_with_the_sweep_and_videos(tmp_path):
    cfg = load_config("configs/toy.yaml", OVERRIDES)
    policy = Policy.from_config(cfg)
    for seed, name in enumerate(adapters.ADAPTERS, 1):  # two different adapters that really change the policy
        for p in adapters.train_adapter(policy.model, name):
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        adapters.save_adapter(policy.model, name, tmp_path / "adapters" / name)

    code = main(["--adapters", str(tmp_path), "--scales", "0", "1", "--videos", "1", *OVERRIDES])
    assert code == 0
    out = tmp_path / "eval"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["eval_videos"] == {"in_domain": 4, "out_of_domain": 2}
    rows = {r["policy"]: r for r in scores["scores"]}
    assert list(rows) == [
        "reference (base)",
        "on_policy adapter alone",
        "semi adapter alone",
        "merged, s = 0",
        "merged, s = 1",
    ]
    # The two adapters move the policy apart (measured: their rewards differ by ~6e-3, s = 0 and 1 by
    # ~8e-3), so the sweep's points are told apart by more than rounding: s = 0 is the semi adapter
    # alone (not the on-policy one: the scale applies to dW_on), and s = 1 adds the on-policy adapter.
    semi, on_policy = rows["semi adapter alone"]["in_domain"][0], rows["on_policy adapter alone"]["in_domain"][0]
    assert abs(semi - on_policy) > 1e-3, (semi, on_policy)
    assert rows["merged, s = 0"]["in_domain"] == rows["semi adapter alone"]["in_domain"]
    assert abs(rows["merged, s = 1"]["in_domain"][0] - semi) > 1e-3, rows
    # Every score has its standard error over the 4 videos.
    assert all(r[k][1] > 0 for r in rows.values() for k in ("in_domain", "out_of_domain"))
    # The choice is the dual-improvement rule over the reported sweep.
    pair = lambda r: Scores(r["in_domain"][0], r["out_of_domain"][0])  # noqa: E731
    chosen = pick_merge_scale(
        pair(rows["reference (base)"]), {0.0: pair(rows["merged, s = 0"]), 1.0: pair(rows["merged, s = 1"])}
    )
    assert scores["chosen_scale"] == chosen and scores["dual_improvement_passed"] == (chosen is not None)
    report = (out / "report.md").read_text()
    assert "merged, s = 1" in report and "dual-improvement" in report and " ± " in report
    html = (out / "report.html").read_text()
    assert "reference (base)" in html and "videos/reference_0.mp4" in html
    assert (out / "merge_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "videos" / "reference_0.mp4").stat().st_size > 0

    # One evaluator: the in-process run (bench.toy_alignment's) scores the base exactly as this did.
    run = InProcessRun(cfg)
    with adapters.reference_policy(run.model):
        base = run.evaluate()
    assert [base.in_domain.mean, base.in_domain.stderr] == rows["reference (base)"]["in_domain"]
    assert [base.out_of_domain.mean, base.out_of_domain.stderr] == rows["reference (base)"]["out_of_domain"]


def test_evaluate_refuses_a_config_without_an_out_of_domain_score(tmp_path, capsys):
    args = ["--adapters", str(tmp_path), *OVERRIDES[:2], "run.out_of_domain=null", "run.phases=[on_policy]"]
    assert main(args) == 2
    assert "run.out_of_domain: unset" in capsys.readouterr().err


def test_evaluate_names_a_missing_adapter(tmp_path, capsys):
    assert main(["--adapters", str(tmp_path), "model.diffusers_transformer=null"]) == 2
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().err
