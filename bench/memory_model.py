"""What each role needs in memory at Self-Forcing's real size (480x832, 7 chunks of 3 latent frames,
30 blocks), from the architecture's arithmetic plus one measurement this machine can make.

    python -m bench.memory_model --json

The measured part is the learner's activation memory per query token per block: a forward with grad
through the real-width block (dim 1536, 12 x 128 heads, ffn 8960, LoRA rank 64 on every attention and
FFN linear, bf16 base, fp32 adapters) at a small resolution, counting the bytes of every tensor autograd
saves for the backward (parameters and the constant cache excluded). Activation memory is linear in
query tokens and layers, plus the attention keys/values of the cache that each block's attention
saves; the bench checks that linear model against a second measurement with a cache and reports the
error. Everything else is counting: weights, adapters, AdamW state, KV caches, recorded tensors.

Assumptions, stated in the output: attention runs as a fused kernel (FlashAttention / cuDNN /
memory-efficient SDPA) that keeps no [queries x keys] score matrix; the math fallback would add
batch x heads x queries x keys x 2 bytes per call (12.6 GB for 4 branches at the last chunk). The VAE
decode figure (3.9 GB per 81-frame 480x832 video) is the measurement quoted in the real-size issue
(47 GB for 12 videos at once), not made here.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

GIB = 1024**3
DIM, HEADS, FFN, LAYERS, TEXT_DIM = 1536, 12, 8960, 30, 4096
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def real_size_counts(rank: int = 64) -> dict[str, int]:
    """Parameter counts of the 30-block model and of one LoRA adapter, without allocating them."""
    from common.config import TransformerConfig
    from common.model import adapters
    from common.model.causal_wan import CausalWanTransformer3DModel
    from common.model.loading import parameters_on_meta

    with parameters_on_meta():
        model = CausalWanTransformer3DModel(**TransformerConfig().kwargs())
    base = sum(p.numel() for p in model.parameters())
    keep = set(model._keep_in_fp32_modules or [])
    fp32 = sum(p.numel() for n, p in model.named_parameters() if keep.intersection(n.split(".")))
    adapters.add_adapters(model, rank, 2 * rank, TARGETS, names=(adapters.ON_POLICY,))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"base": base, "base_fp32_kept": fp32, "lora_per_adapter": lora}


def _saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, minus those in `exclude`."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def measure_activations(layers: int = 2, anchors: int = 2, threads: int | None = None) -> dict:
    """Saved-for-backward bytes per query token per block, at the real width, and the linear model's
    error at a second shape (with a cache of two chunks)."""
    from common.config import TransformerConfig
    from common.model import adapters
    from common.model.causal_wan import CausalWanTransformer3DModel
    from common.model.sampler import StreamingSampler
    from common.model.scheduler import FewStepFlowScheduler

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    kwargs = TransformerConfig(num_layers=layers).kwargs()
    model = CausalWanTransformer3DModel(**kwargs).eval().cast(torch.bfloat16)
    adapters.add_adapters(model, 64, 128, TARGETS, names=(adapters.ON_POLICY,))
    adapters.train_adapter(model, adapters.ON_POLICY)
    latent = 8  # 8x8 latents: 16 tokens a frame, 48 a chunk of 3 frames
    sampler = StreamingSampler(
        model,
        FewStepFlowScheduler([1000, 750, 500, 250]),
        num_chunks=3,
        frames_per_chunk=3,
        latent_height=latent,
        latent_width=latent,
    )
    text = torch.randn(1, 16, TEXT_DIM)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = 3 * (latent // 2) ** 2

    def saved(pivot: int) -> tuple[int, int]:
        prefix = torch.randn(1, 16, 3 * pivot, latent, latent)
        cache = sampler.rebuild_cache(text, prefix)
        constants = params | {t.untyped_storage().data_ptr() for c in cache.chunks for t in (*c.keys, *c.values)}
        x_t = torch.randn(anchors, 16, 3, latent, latent)
        nbytes = _saved_bytes(lambda: sampler.predict_x0(x_t, 0, pivot, text, cache).sum().backward(), constants)
        return nbytes, pivot * tokens

    no_cache, _ = saved(0)
    per_token_block = no_cache / (anchors * tokens * layers)
    with_cache, cache_tokens = saved(2)
    # Each block's attention saves the concatenated keys and values: cache tokens x dim x 2 x bf16.
    kv_per_cache_token_block = 2 * DIM * 2
    predicted = no_cache + anchors * cache_tokens * layers * kv_per_cache_token_block
    return {
        "per_query_token_block_bytes": per_token_block,
        "kv_per_cache_token_block_bytes": kv_per_cache_token_block,
        "check_with_cache": {
            "measured_bytes": with_cache,
            "predicted_bytes": predicted,
            "relative_error": abs(predicted - with_cache) / with_cache,
        },
        "measured_at": {
            "layers": layers,
            "anchors": anchors,
            "query_tokens": tokens,
            "dtype": "bfloat16",
            "lora_rank": 64,
        },
    }


def predict(
    counts: dict,
    act: dict,
    *,
    height: int = 480,
    width: int = 832,
    num_chunks: int = 7,
    frames_per_chunk: int = 3,
    group_size: int = 12,
    anchors: int = 4,
    fork_batch: int = 4,
    decode_batch: int = 1,
    eval_batch: int = 2,
    anchor_micro_batch: int | None = None,
) -> dict:
    """Bytes per role at the given size, worst pivot, from the counts and the measured activations."""
    tokens_chunk = frames_per_chunk * (height // 16) * (width // 16)
    latent_chunk = 16 * frames_per_chunk * (height // 8) * (width // 8)
    kv_chunk = LAYERS * 2 * tokens_chunk * DIM * 2  # every block's K and V of one chunk, bf16, batch 1
    base = (counts["base"] - counts["base_fp32_kept"]) * 2 + counts["base_fp32_kept"] * 4
    lora = counts["lora_per_adapter"] * 4  # fp32 master weights
    adamw = 2 * lora  # exp_avg and exp_avg_sq, fp32

    written = num_chunks - 1  # the last chunk's context pass is skipped: nothing reads it
    branch_cache = fork_batch * written * kv_chunk  # pivot 0: every branch writes chunks 0..L-2
    gather = fork_batch * written * tokens_chunk * DIM * 2 * 2  # one block's K/V concatenation, transient
    ffn_transient = fork_batch * tokens_chunk * FFN * 2
    decode = decode_batch * 3.9 * GIB
    rollout_weights = base + 2 * lora + 127e6 * 2  # both adapters, the Wan VAE in bf16
    fork_peak = rollout_weights + branch_cache + gather + ffn_transient
    eval_peak = rollout_weights + eval_batch * written * kv_chunk + gather
    rollout = {
        "weights": rollout_weights,
        "fork_kv_cache": branch_cache,
        "fork_transient": gather + ffn_transient,
        "decode": decode,
        "eval_kv_cache": eval_batch * written * kv_chunk,
        "peak": max(fork_peak, eval_peak, rollout_weights + decode),
    }

    m = anchor_micro_batch or anchors
    q = m * tokens_chunk
    cache_tokens = (num_chunks - 1) * tokens_chunk  # pivot = last chunk: the longest prefix
    per_block = q * act["per_query_token_block_bytes"] + m * cache_tokens * act["kv_per_cache_token_block_bytes"]
    learner_weights = base + 2 * lora + 2 * adamw + lora  # both adapters and optimisers, one gradient
    records = 2 * group_size * 4 * latent_chunk * 4  # pivot inputs and predictions, fp32
    prefix_cache = (num_chunks - 1) * kv_chunk
    without = LAYERS * per_block
    # Checkpointed: each block keeps its input (bf16 hidden states) and recomputes one block at a time.
    with_ckpt = LAYERS * q * DIM * 2 + per_block
    learner = {
        "weights_adapters_optimiser": learner_weights,
        "prefix_cache": prefix_cache,
        "records": records,
        "activations_without_checkpointing": without,
        "activations_with_checkpointing": with_ckpt,
        "peak_without_checkpointing": learner_weights + prefix_cache + records + without,
        "peak_with_checkpointing": learner_weights + prefix_cache + records + with_ckpt,
    }
    gib = lambda d: {k: round(v / GIB, 2) for k, v in d.items()}  # noqa: E731
    return {
        "resolution": [height, width],
        "tokens_per_chunk": tokens_chunk,
        "kv_cache_per_chunk_gib": round(kv_chunk / GIB, 3),
        "anchors_per_pass": m,
        "fork_batch_size": fork_batch,
        "decode_batch_size": decode_batch,
        "eval_batch_size": eval_batch,
        "rollout_gib": gib(rollout),
        "learner_gib": gib(learner),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory_model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--layers", type=int, default=2, help="blocks in the measured model (real width)")
    args = parser.parse_args(argv)
    counts = real_size_counts()
    act = measure_activations(layers=args.layers)
    out = {
        "params_billion": round(counts["base"] / 1e9, 3),
        "lora_params_million_per_adapter": round(counts["lora_per_adapter"] / 1e6, 1),
        "activations": act,
        "assumptions": [
            "fused SDPA kernel (no score matrix)",
            "VAE decode 3.9 GB per 81-frame video (quoted)",
            "worst pivot for each role",
            "Qwen2-VL-2B reward server not modelled: 4.4 GB of bf16 weights",
        ],
        "learner_micro_batch_4": predict(counts, act),
        "learner_micro_batch_1": predict(counts, act, anchor_micro_batch=1),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
