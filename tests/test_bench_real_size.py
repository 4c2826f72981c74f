"""bench.real_size, reduced: the whole job (reference, semi, on_policy, merge through cluster.train.run,
local Ray, embedded Redis) on the real architectures at their real width, in bfloat16, from files in
the real layouts: a 2-block Self-Forcing transformer of dim 1536 (12 x 128 heads, FFN 8960, text dim
4096) read from Self-Forcing's checkpoint layout, the Wan2.1 VAE, a reduced UMT5 of width 4096, and a
tiny VideoAlign. Smaller videos, groups and prompt token counts than the bench's default keep it near a
minute: the Wan VAE decodes a 64x64, 33-frame clip in ~14 s on one core, and the reduced UMT5 takes
~4 s a prompt at 512 tokens.

Marked `slow` and `cluster`: `make test-fast` (`pytest -m "not cluster and not slow"`) leaves it out.
"""

from __future__ import annotations

import json

import pytest

from bench.real_size import main

# The whole job on local Ray with an embedded redis-server, about a minute: both markers.
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_real_width_job_trains_both_adapters_in_bf16(tmp_path, capsys):
    root = tmp_path / "real_size"
    code = main(
        [
            "--json",
            "--layers",
            "2",
            "--reward",
            "tiny",
            "--sample-prompts",
            "0",
            "--root",
            str(root),
            "sampler.height=32",
            "sampler.width=32",
            "sampler.num_chunks=2",
            "sampler.frames_per_chunk=1",
            "algorithm.group_size=4",
            "algorithm.num_anchors=2",
            "replay.num_reference_groups=1",
            "model.max_text_tokens=32",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["finished"], result.get("error")
    assert result["transformer"] == {
        "num_layers": 2,
        "dim": 1536,
        "heads": 12,
        "head_dim": 128,
        "ffn_dim": 8960,
        "text_dim": 4096,
    }
    assert result["dtype"] == "bfloat16" and result["lora_dtype"] == "float32" and result["lora_rank"] == 64
    assert result["on_policy_updates"] >= 2 and result["groups"] == 3
    assert set(result["adapter_update_norm"]) == {"semi", "on_policy"}
    assert all(v > 0 for v in result["adapter_update_norm"].values()), result["adapter_update_norm"]
    assert set(result["peak_rss_gb"]) == {"rollout", "reward", "learner", "driver"}
    assert all(v > 0 for v in result["peak_rss_gb"].values())
    # One broadcast after the semi phase and one after each on-policy update, each carrying both
    # rank-64 adapters in float32.
    assert len(result["weight_sync_bytes"]) == 3 and min(result["weight_sync_bytes"]) > 0
    assert len(result["record_bytes"]) == 3 and min(result["record_bytes"]) > 0
    assert result["checkpoint_bytes"] > 0
    assert {"startup", "reference", "semi", "on_policy", "merge", "total"} <= set(result["seconds"])
    assert "REDUCED UMT5" in result["text_encoder"]
    # The GBs of weights, checkpoints and adapters are gone unless --keep; the report stays.
    assert not (root / "weights").exists() and not (root / "job" / "checkpoints").exists()
    assert json.loads((root / "real_size.json").read_text())["finished"]
