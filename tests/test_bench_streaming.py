"""The streaming benchmark runs end to end and reports every figure the issue names (no timing asserts)."""

from __future__ import annotations

import json

from bench.streaming import main
from tests.conftest import BF16_ULP


def test_streaming_bench_prints_its_json(capsys):
    assert main(["--json", "--repeats", "1", "sampler.num_chunks=3", "algorithm.group_size=4"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in (
        "stream_vs_full_max_abs_err",
        "kv_cache_speedup",
        "fork_speedup",
        "fork_peak_memory_mb",
        "stream_fps",
        "fork_cost_model_ratio",
    ):
        assert key in result
    assert result["stream_vs_full_max_abs_err"] < 1e-4
    assert len(result["fork_s_by_pivot"]) == 3


def test_streaming_bench_rejects_bad_config(capsys):
    assert main(["--json", "sampler.nope=1"]) == 2
    assert "sampler.nope" in capsys.readouterr().err


def test_streaming_bench_runs_in_bf16(capsys):
    # The real config's dtype, at the smallest size that still forks (bf16 is slow on CPUs).
    args = ["sampler.num_chunks=2", "algorithm.group_size=2", "algorithm.num_anchors=2", "model.dtype=bfloat16"]
    assert main(["--json", "--repeats", "1", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and len(result["fork_s_by_pivot"]) == 2
    assert result["stream_vs_full_max_abs_err"] < BF16_ULP  # 0 here; see tests/test_causal_wan.py
