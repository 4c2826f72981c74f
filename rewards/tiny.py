"""Tiny reward models of the real architectures, with random weights, saved in the real on-disk
layouts: for tests and `bench.rewards` (nothing can be downloaded here, and the real ones are GBs).

    make_tiny_videoalign(dir)  -> dir/{base/ (Qwen2-VL: config, weights, tokenizer, preprocessor,
                                  chat template), model_config.json, checkpoint-<step>/model.pth}
    make_tiny_videoalign(dir, size="2b")   the same layout at Qwen2-VL-2B-Instruct's real size
    make_tiny_clip(dir)        -> a Hugging Face CLIPModel directory with its processor

The VideoAlign reward weights are written in the pre-4.52 transformers key layout the released
checkpoint uses (`visual.*`, `model.*`, `lm_head.*`, `rm_head.weight`), so loading them exercises
the key translation. Building takes a few seconds on CPU.

`size="2b"` (bench.real_size): Qwen2-VL-2B-Instruct's dimensions (QWEN2_VL_2B: 28 decoder layers of
1536, 12 heads / 2 KV heads, MLP 8960, vocabulary 151936, tied embeddings; a 32-block vision tower of
1280) and a tokenizer of Qwen2's length (151643 ordinary tokens, most of them fillers no text maps
to, then Qwen2's 14 special tokens at their real ids), so the reward model has its real 2.2B
parameters. The model is never built in memory: its parameters are created on the meta device and
each is filled with seeded random values directly in bfloat16 (4.4 GB written as model.pth). Its
base/ directory holds the config, tokenizer, preprocessor and chat template but no weights (a full
checkpoint never reads them), so only the LoRA layout is refused at this size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CORPUS = [
    "a red circle moving left on a black background",
    "a green square moving up on a gray background",
    "Rate this AI-generated video on three separate criteria visual quality motion quality text alignment",
    "Please provide the ratings of Visual Quality Motion Quality Text Alignment prompt END",
    "You are a helpful assistant. system user assistant",
]


def _bpe(vocab_size: int, special: list[str], suffix: str | None = None, lowercase: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    kwargs = {"end_of_word_suffix": suffix} if suffix else {}
    tok = Tokenizer(models.BPE(unk_token=special[-1] if suffix else None, **kwargs))
    if lowercase:
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **kwargs
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


# Qwen2-VL-2B-Instruct's config.json (text and vision dimensions, token ids), as released.
QWEN2_VL_2B = {
    "text_config": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        sliding_window=32768,
        use_sliding_window=False,
        max_window_layers=28,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=True,
    ),
    "vision_config": dict(
        depth=32,
        embed_dim=1280,
        hidden_size=1536,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        hidden_act="quick_gelu",
    ),
    "tie_word_embeddings": True,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
# Qwen2's special tokens in id order from 151643 (after its 151643 byte-level BPE tokens).
QWEN2_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN2_ORDINARY_TOKENS = 151643


def _legacy_name(k: str) -> str:
    if k.startswith("model.visual."):
        return k[len("model.") :]
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model.") :]
    return k


def _legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_legacy_name(k): v.clone() for k, v in state.items()}


def _qwen2_sized_tokenizer():
    """A byte-level BPE learnt on CORPUS, padded with unreachable filler tokens to Qwen2's 151643
    ordinary tokens, then Qwen2's special tokens at their real ids (len 151657, as Qwen2-VL's)."""
    from tokenizers import Tokenizer
    from transformers import Qwen2TokenizerFast

    data = json.loads(_bpe(384, []).to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), QWEN2_ORDINARY_TOKENS):
        vocab[f"<filler_{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(QWEN2_SPECIAL)
    return Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768
    )


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Seeded random weights that keep a deep random network finite: matrices (and convolutions)
    with std 1/sqrt(fan_in), norm weights one and their biases zero, other vectors (biases) small."""
    last = name.rsplit(".", 2)[-2] if name.count(".") else name
    if "norm" in last or last.startswith("ln_"):
        return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    if len(shape) >= 2:
        fan_in = max(1, out.numel() // shape[0])
        return out.normal_(0.0, fan_in**-0.5, generator=generator)
    return out.normal_(0.0, 0.02, generator=generator)


def _write_videoalign_2b(root: Path, base: Path, step: int, output_dim: int, seed: int) -> None:
    """Qwen2-VL-2B-Instruct-sized VideoReward files (see the module docstring), from meta shapes and
    bfloat16 random tensors: the 4.4 GB state dict is the only copy ever held."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from common.model.loading import parameters_on_meta
    from rewards.videoalign import FALLBACK_CHAT_TEMPLATE, REWARD_TOKENS

    tok = _qwen2_sized_tokenizer()
    config = Qwen2VLConfig(**QWEN2_VL_2B)
    config.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384).save_pretrained(str(base))
    (base / "chat_template.jinja").write_text(FALLBACK_CHAT_TEMPLATE)

    tok.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    config.text_config.vocab_size = len(tok)  # the reward model's embeddings, resized at training time
    with parameters_on_meta():
        shapes = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).state_dict()
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        if name == "lm_head.weight":
            continue
        state[_legacy_name(name)] = random_tensor(name, tuple(shapes[name].shape), generator, torch.bfloat16)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, stored once
    hidden = QWEN2_VL_2B["text_config"]["hidden_size"]
    state["rm_head.weight"] = torch.randn(output_dim, hidden, generator=generator).mul(hidden**-0.5).bfloat16()
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(state, ckpt / "model.pth")


def make_tiny_videoalign(
    root: str | Path, step: int = 11352, output_dim: int = 1, seed: int = 0, lora: bool = False, size: str = "tiny"
) -> Path:
    """A VideoReward checkpoint directory with random weights (see the module docstring); returns
    `root`. `size`: "tiny" (a few MB, float32) or "2b" (Qwen2-VL-2B-Instruct's real dimensions,
    bfloat16, 4.4 GB; no LoRA layout)."""
    from transformers import Qwen2TokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from rewards.videoalign import FALLBACK_CHAT_TEMPLATE, REWARD_TOKENS

    if size not in ("tiny", "2b"):
        raise ValueError(f"size must be 'tiny' or '2b', got {size!r}")
    if size == "2b" and lora:
        raise ValueError("the LoRA layout needs the base weights, which size='2b' does not write")
    root = Path(root)
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    if size == "2b":
        _write_videoalign_2b(root, base, step, output_dim, seed)
        _write_model_config(root, output_dim, {"lora_enable": False})
        return root
    torch.manual_seed(seed)
    tok = Qwen2TokenizerFast(
        tokenizer_object=_bpe(384, QWEN_SPECIAL),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok) + 13,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            pad_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    Qwen2VLImageProcessorPil(min_pixels=128 * 28 * 28, max_pixels=448 * 448).save_pretrained(str(base))
    (base / "chat_template.jinja").write_text(FALLBACK_CHAT_TEMPLATE)

    # The reward model: three reward tokens added, embeddings resized, a head; then trained weights.
    tok.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    head = torch.randn(output_dim, 64) * 0.5
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    state = _legacy_keys(model.state_dict())
    state["rm_head.weight"] = head
    lora_cfg = {"lora_enable": False}
    if lora:
        # peft layout: LoRA A/B of two projections in the adapter file, everything else in non_lora.
        from safetensors.torch import save_file

        base_model = Qwen2VLForConditionalGeneration.from_pretrained(str(base))
        base_model.resize_token_embeddings(len(tok))
        base_state = _legacy_keys(base_model.state_dict())
        rank, alpha = 4, 8
        adapter, non_lora = {}, {}
        for k in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            w = base_state[k + ".weight"]
            a, b = torch.randn(rank, w.shape[1]) * 0.1, torch.randn(w.shape[0], rank) * 0.1
            adapter[f"base_model.model.{k}.lora_A.weight"] = a
            adapter[f"base_model.model.{k}.lora_B.weight"] = b
            state[k + ".weight"] = w + (alpha / rank) * b @ a
        for k in ("model.embed_tokens.weight", "lm_head.weight", "rm_head.weight"):
            non_lora[f"base_model.model.{k}"] = state[k]
        for k in state:  # the rest equals the base (the trainer saved only trained parts)
            if (
                k not in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
                and f"base_model.model.{k}" not in non_lora
            ):
                state[k] = base_state[k]
        save_file(adapter, str(ckpt / "adapter_model.safetensors"))
        torch.save(non_lora, ckpt / "non_lora_state_dict.pth")
        torch.save(state, root / "expected_state.pth")  # what a correct merge must give (tests)
        lora_cfg = {"lora_enable": True, "lora_r": rank, "lora_alpha": alpha, "use_rslora": False}
    else:
        torch.save(state, ckpt / "model.pth")
    _write_model_config(root, output_dim, lora_cfg)
    return root


def _write_model_config(root: Path, output_dim: int, lora_cfg: dict) -> None:
    meta = {
        "data_config": {
            "fps": 2.0,
            "num_frames": None,
            "max_frame_pixels": 448 * 448,
            "sample_type": "uniform",
            "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special",
        },
        "model_config": {
            "model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct",
            "output_dim": output_dim,
            "reward_token": "special",
            "use_special_tokens": True,
        },
        "peft_lora_config": lora_cfg,
        "inference_config": {
            "VQ_mean": 3.6757,
            "VQ_std": 2.2476,
            "MQ_mean": 1.1646,
            "MQ_std": 1.3811,
            "TA_mean": 2.8105,
            "TA_std": 2.5121,
        },
    }
    (root / "model_config.json").write_text(json.dumps(meta, indent=2))


# CLIP ViT-L/14 (openai/clip-vit-large-patch14), the shape the real config's out-of-domain scorer has.
CLIP_SIZES = {
    "tiny": dict(text=(32, 64, 2, 2), vision=(32, 64, 2, 2), image=32, patch=8, projection=16),
    "vit-l-14": dict(text=(768, 3072, 12, 12), vision=(1024, 4096, 24, 16), image=224, patch=14, projection=768),
}


def make_tiny_clip(root: str | Path, seed: int = 0, max_positions: int = 77, size: str = "tiny") -> Path:
    """A CLIPModel directory with random weights and its processor (tokenizer + image processor):
    `size` "tiny" (tests) or "vit-l-14" (the real architecture, 428M parameters; the tokenizer stays
    a small BPE, so only the token embedding is smaller than the real one)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    special = ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(
        tokenizer_object=_bpe(300, special, suffix="</w>", lowercase=True),
        bos_token=special[0],
        eos_token=special[1],
        pad_token=special[1],
        unk_token=special[1],
        model_max_length=max_positions,
    )
    dims = CLIP_SIZES[size]
    (t_hidden, t_ffn, t_layers, t_heads), (v_hidden, v_ffn, v_layers, v_heads) = dims["text"], dims["vision"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=t_hidden,
            intermediate_size=t_ffn,
            num_hidden_layers=t_layers,
            num_attention_heads=t_heads,
            max_position_embeddings=max_positions,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            image_size=dims["image"],
            patch_size=dims["patch"],
            hidden_size=v_hidden,
            intermediate_size=v_ffn,
            num_hidden_layers=v_layers,
            num_attention_heads=v_heads,
        ),
        projection_dim=dims["projection"],
    )
    CLIPModel(config).eval().save_pretrained(str(root))
    side = dims["image"]
    image = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(str(root))
    return root
