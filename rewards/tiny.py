"""Tiny reward models of the real architectures, with random weights, saved in the real on-disk
layouts: for tests and `bench.rewards` (nothing can be downloaded here, and the real ones are GBs).

    make_tiny_videoalign(dir)  -> dir/{base/ (Qwen2-VL: config, weights, tokenizer, preprocessor,
                                  chat template), model_config.json, checkpoint-<step>/model.pth}
    make_tiny_clip(dir)        -> a Hugging Face CLIPModel directory with its processor

The VideoAlign reward weights are written in the pre-4.52 transformers key layout the released
checkpoint uses (`visual.*`, `model.*`, `lm_head.*`, `rm_head.weight`), so loading them exercises
the key translation. Building takes a few seconds on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
CORPUS = ["a red circle moving left on a black background", "a green square moving up on a gray background",
          "Rate this AI-generated video on three separate criteria visual quality motion quality text alignment",
          "Please provide the ratings of Visual Quality Motion Quality Text Alignment prompt END",
          "You are a helpful assistant. system user assistant"]


def _bpe(vocab_size: int, special: list[str], suffix: str | None = None, lowercase: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    kwargs = {"end_of_word_suffix": suffix} if suffix else {}
    tok = Tokenizer(models.BPE(unk_token=special[-1] if suffix else None, **kwargs))
    if lowercase:
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **kwargs)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def _legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        out[k] = v.clone()
    return out


def make_tiny_videoalign(root: str | Path, step: int = 11352, output_dim: int = 1, seed: int = 0,
                         lora: bool = False) -> Path:
    """A tiny VideoReward checkpoint directory (see the module docstring); returns `root`."""
    from transformers import Qwen2TokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from rewards.videoalign import FALLBACK_CHAT_TEMPLATE, REWARD_TOKENS

    root = Path(root)
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = Qwen2TokenizerFast(tokenizer_object=_bpe(384, QWEN_SPECIAL), eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", model_max_length=32768)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok) + 13, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=ids["<|endoftext|>"],
                         pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
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
        for k, v in state.items():  # the rest equals the base (the trainer saved only trained parts)
            if k not in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight") \
                    and f"base_model.model.{k}" not in non_lora:
                state[k] = base_state[k]
        save_file(adapter, str(ckpt / "adapter_model.safetensors"))
        torch.save(non_lora, ckpt / "non_lora_state_dict.pth")
        torch.save(state, root / "expected_state.pth")  # what a correct merge must give (tests)
        lora_cfg = {"lora_enable": True, "lora_r": rank, "lora_alpha": alpha, "use_rslora": False}
    else:
        torch.save(state, ckpt / "model.pth")
    meta = {
        "data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 448 * 448, "sample_type": "uniform",
                        "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special"},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": output_dim,
                         "reward_token": "special", "use_special_tokens": True},
        "peft_lora_config": lora_cfg,
        "inference_config": {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811,
                             "TA_mean": 2.8105, "TA_std": 2.5121},
    }
    (root / "model_config.json").write_text(json.dumps(meta, indent=2))
    return root


def make_tiny_clip(root: str | Path, seed: int = 0, max_positions: int = 77) -> Path:
    """A tiny CLIPModel directory with its processor (tokenizer + image processor)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    special = ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(tokenizer_object=_bpe(300, special, suffix="</w>", lowercase=True),
                        bos_token=special[0], eos_token=special[1], pad_token=special[1], unk_token=special[1],
                        model_max_length=max_positions)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(str(root))
    image = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(str(root))
    return root
