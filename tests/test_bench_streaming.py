"""The streaming benchmark runs end to end and reports every figure the issue names (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from bench.streaming import main
from tests.conftest import BF16_ULP


def test_streaming_bench_prints_its_json(capsys):
    args = ["--json", "--repeats", "1", "--baseline", "--profile", "sampler.num_chunks=3", "algorithm.group_size=4"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for key in (
        "stream_vs_full_max_abs_err",
        "kv_cache_speedup",
        "fork_speedup",
        "fork_peak_memory_mb",
        "stream_fps",
        "first_chunk_latency_s",
        "fork_cost_model_ratio",
        "fork_mfu_concatenating",
    ):
        assert key in result
    # The FLOP model of a fork's speed-up: G independent rollouts count more FLOPs than one fork.
    assert result["fork_flop_model_ratio"] > 1 and result["fork_flop_model_efficiency"] > 0
    assert result["stream_vs_full_max_abs_err"] < 1e-4
    assert len(result["fork_s_by_pivot"]) == 3
    # MFU: achieved FLOP/s over the GEMM rate measured in the same run, at the block's linear shapes
    # (3 tokens x dim x {dim, 3 dim, ffn} and tokens x ffn x dim, at batch 1 and fork_batch_size).
    assert len(result["gemm_tflops_by_shape"]) == 8 and result["gemm_peak_tflops"] > 0
    assert result["gemm_peak_tflops"] == max(result["gemm_tflops_by_shape"].values())
    # Positive and finite; not "< 1": the peak and the rollout are timed at different moments, and on
    # a shared machine (CI) the peak can be measured under more load than the rollout (no timing asserts).
    for key in ("rollout_mfu", "fork_mfu", "update_mfu"):
        assert 0 < result[key] < float("inf"), (key, result[key])
    assert result["fork_mfu"] == result["fork_mfu_by_pivot"][result["mfu_pivot"]]
    # FLOPs: a fork of 4 at pivot 1 runs chunk 0 at batch 1 and chunks 1-2 at batch 4, so it counts
    # more than a rollout and less than four; an update runs forward and backward passes.
    assert result["rollout_gflop"] < result["fork_gflop"] < 4 * result["rollout_gflop"]
    assert result["update_gflop"] > 0
    for breakdown in result["time_breakdown"].values():
        assert set(breakdown) == {"gemm", "attention", "concat", "copy_cast", "elementwise_other"}
        assert abs(sum(breakdown.values()) - 1) < 1e-2 and breakdown["gemm"] > 0
    # Which attention kernel ran: left to SDPA on a CPU, its flash kernel.
    assert result["attention_backend"].startswith("native")
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in result["attention_kernels"]


def test_a_configured_attention_backend_is_the_one_that_runs(capsys):
    args = ["--json", "--repeats", "1", "--skip-update", "sampler.num_chunks=2"]
    args += ["algorithm.group_size=2", "algorithm.num_anchors=2"]
    default = _AttentionBackendRegistry.get_active_backend()[0]
    assert main([*args, "model.attention_backend=_native_math"]) == 0
    # Only that model's: the process-wide default, which other models use, is left as it was.
    assert _AttentionBackendRegistry.get_active_backend()[0] == default
    result = json.loads(capsys.readouterr().out)
    assert result["attention_backend"] == "_native_math"
    kernels = result["attention_kernels"]
    assert "aten::_scaled_dot_product_attention_math" in kernels, kernels
    assert not any("flash" in k for k in kernels), kernels
    # A backend whose package is missing is refused when the model is built, naming the key.
    if importlib.util.find_spec("sageattention") is None:
        with pytest.raises(ValueError, match=r"model.attention_backend='sage'.*sageattention"):
            main([*args, "model.attention_backend=sage"])
    # A name diffusers' dispatcher does not know is refused at load, naming the field.
    assert main([*args, "model.attention_backend=fastest"]) == 2
    assert "model.attention_backend" in capsys.readouterr().err


def test_flop_count_covers_matmuls_and_cpu_attention():
    # FlopCounterMode does not know the CPU flash-attention kernel: counted here like the CUDA ones.
    import torch

    from bench.streaming import count_flops

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    expected = 2 * (2 * 2 * 3 * 5 * 7 * 8)  # q k^T and p v
    flops, _ = count_flops(lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v))
    assert flops == expected
    flops, _ = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert flops == expected
    flops, _ = count_flops(lambda: torch.nn.functional.linear(torch.randn(4, 6), torch.randn(9, 6)))
    assert flops == 2 * 4 * 6 * 9


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
