"""VideoAlign's VideoReward: Qwen2-VL-2B with a linear reward head read at three special tokens.

Components: `vq`, `mq`, `ta` (normalised with the published statistics unless `normalize: false`),
`overall` = vq + mq + ta, and the raw head outputs `vq_raw`, `mq_raw`, `ta_raw`.

How a video is scored (what VideoAlign's inference does, re-implemented here on transformers 5.x
without torchvision or qwen-vl-utils):
  1. frames sampled at `fps` (2) with Qwen-VL's rule (rewards.base.fps_frame_indices: an 81-frame
     16 fps clip gives 10 frames), each resized (bicubic, antialiased, rounded to uint8) to the
     Qwen-VL size rule with at most `max_pixels` (448 x 448 = 200704) pixels: 480x832 -> 336x588;
  2. frames rescaled to [0, 1], normalised with the preprocessor's mean/std, and cut into Qwen2-VL
     patches (temporal 2, spatial 14, merge 2) in the image processor's order (tested equal);
  3. the text: the prompt template (with `{text_prompt}` and the tokens <|VQ_reward|>,
     <|MQ_reward|>, <|TA_reward|>) inside the base model's chat template, user turn = [video, text],
     generation prompt appended; the one <|video_pad|> is expanded to t*h*w/4 tokens;
  4. Qwen2-VL's decoder (multimodal RoPE), last hidden state at each reward token -> rm_head
     (Linear(hidden, output_dim, bias=False)); output_dim 1: that value; output_dim 3: column k
     for the k-th token (VQ, MQ, TA), as VideoAlign's "special" reward token mode does;
  5. normalisation (x - mean) / std with the checkpoint's `inference_config`, else the published
     VQ (3.6757, 2.2476), MQ (1.1646, 1.3811), TA (2.8105, 2.5121); overall = sum.

On-disk layout loaded (the released KwaiVGI/VideoReward checkpoint; assumptions marked *):
  <path>/model_config.json       {"data_config": {fps, max_frame_pixels, ...}, "model_config":
                                  {model_name_or_path, output_dim, reward_token, use_special_tokens,
                                  ...}, "peft_lora_config": {lora_enable, lora_r, lora_alpha, ...},
                                  "inference_config": {VQ_mean, VQ_std, MQ_mean, ...}}
  <path>/checkpoint-<step>/model.pth   a torch state dict of the whole reward model (the latest
                                  step unless `checkpoint_step`), keys either in the pre-4.52
                                  transformers layout (`visual.*`, `model.*`, `lm_head.*`,
                                  `rm_head.weight`) or the 5.x one (`model.visual.*`,
                                  `model.language_model.*`); a `base_model.model.` / `module.`
                                  prefix is stripped. `model.safetensors` is accepted instead (*).
  or  <path>/checkpoint-<step>/adapter_model.safetensors + non_lora_state_dict.pth   a LoRA
                                  checkpoint: merged into the base weights (W += alpha/r B A).
  base model (`base_model`, else <path>/base (*), else model_config.json's model_name_or_path if
  it is a local directory): a Hugging Face Qwen2-VL-2B-Instruct directory (config.json,
  tokenizer files, preprocessor_config.json, the chat template, and for LoRA checkpoints the
  weights). The tokenizer gets the three reward tokens added (if absent) and the embeddings are
  resized to len(tokenizer), as at training time.
  The prompt template (*): VideoAlign's "detailed_special" text is not copied into this project.
  Put it in <path>/prompt_template.txt (or `prompt_template:`), with `{text_prompt}` where the
  prompt goes, to reproduce published scores; otherwise a built-in template of the same structure
  (instructions, then one rating request per dimension ending in its reward token) is used, and a
  warning says so. Scores of the released model depend on the exact template text.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from common.errors import RewardError
from rewards.base import DTYPES, RewardModel, fps_frame_indices, resolve_device, smart_resize, truncate_tokens

log = logging.getLogger(__name__)

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("vq", "mq", "ta")
# The published normalisation (VideoAlign inference_config): (mean, std) of the raw head outputs.
PUBLISHED_NORM = {"vq": (3.6757, 2.2476), "mq": (1.1646, 1.3811), "ta": (2.8105, 2.5121)}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BUILTIN_TEMPLATE = (
    "\nRate this AI-generated video on three separate criteria, each from 0 (worst) to 10 (best), "
    "independently of one another.\n\n"
    "Visual Quality: static, per-frame quality (sensible content, sharpness, detail, aesthetics, "
    "safety).\nPlease provide the ratings of Visual Quality: <|VQ_reward|>\nEND\n\n"
    "Motion Quality: dynamics (stability across frames, natural and smooth movement, clean blending "
    "of moving parts, enough movement).\nPlease provide the ratings of Motion Quality: <|MQ_reward|>\nEND\n\n"
    "Text Alignment: does the video match the prompt (subject, motion, environment, style, camera)?\n"
    "Textual prompt - {text_prompt}\nPlease provide the ratings of Text Alignment: <|TA_reward|>\nEND\n"
)
# Used only when the base directory has no chat template: Qwen2-VL's chat format.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise RewardError(f"VideoAlign: {what} not found at {path}")
    return path


def _find_checkpoint(path: Path, step: int | None) -> Path:
    found = {}
    for d in glob.glob(str(path / "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))
        if m and os.path.isdir(d):
            found[int(m.group(1))] = Path(d)
    if not found:
        raise RewardError(f"VideoAlign: no checkpoint-<step>/ directory in {path}")
    if step is not None:
        if step not in found:
            raise RewardError(f"VideoAlign: checkpoint-{step} not in {path} (have {sorted(found)})")
        return found[step]
    return found[max(found)]


def _load_state(file: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a torch or safetensors file. `mmap`: a torch (zip) file's tensors are views
    of the mapped file (private, copy-on-write) instead of a copy read into memory."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            try:
                state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not mmap or "mmap can only be used" not in str(exc):
                    raise
                state = torch.load(str(file), map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as exc:
        raise RewardError(f"VideoAlign: cannot read {file}: {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RewardError(f"VideoAlign: {file} is not a state dict of tensors")
    return state


def translate_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any VideoAlign key layout -> transformers 5.x Qwen2VLForConditionalGeneration + rm_head."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "base_model.model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
            key = "model.language_model." + key[len("model.") :]
        out[key] = value
    return out


def merge_lora(
    base: dict[str, torch.Tensor],
    lora: dict[str, torch.Tensor],
    non_lora: dict[str, torch.Tensor],
    alpha: float,
    rank: int,
    rslora: bool = False,
) -> dict[str, torch.Tensor]:
    """A peft LoRA checkpoint (adapter_model.safetensors + non_lora_state_dict.pth) merged into full
    weights: W + scale * B @ A with scale alpha / r (alpha / sqrt(r) with rsLoRA)."""
    scale = alpha / (rank**0.5 if rslora else rank)
    merged = dict(base)
    for key, value in non_lora.items():
        if ".original_module." in key:
            continue
        key = key.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
        merged.update(translate_keys({key: value}))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        m = re.fullmatch(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise RewardError(f"VideoAlign: unexpected LoRA key {key!r}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise RewardError(f"VideoAlign: LoRA module {module} lacks its A or B matrix")
        target = next(iter(translate_keys({module + ".weight": ab["A"]})))
        if target not in merged:
            raise RewardError(f"VideoAlign: LoRA targets {target}, which the base model does not have")
        w = merged[target]
        merged[target] = (w.float() + scale * ab["B"].float() @ ab["A"].float()).to(w.dtype)
    return merged


def patchify(
    frames: torch.Tensor, patch: int = 14, temporal: int = 2, merge: int = 2, mean=CLIP_MEAN, std=CLIP_STD
) -> tuple[torch.Tensor, list[int]]:
    """uint8-valued float frames [T, 3, H, W] (H, W multiples of patch*merge, T of temporal) ->
    (Qwen2-VL pixel_values [t*h*w, 3*temporal*patch*patch], grid [t, h, w])."""
    x = frames.float() / 255.0
    x = (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]
    t, c, h, w = x.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = x.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * temporal * patch * patch)
    return x, [gt, gh, gw]


class VideoAlignReward(RewardModel):
    name = "videoalign"

    def __init__(
        self,
        path,
        base_model=None,
        checkpoint_step=None,
        device="cpu",
        dtype="float32",
        fps=2.0,
        max_pixels=448 * 448,
        min_pixels=128 * 28 * 28,
        normalize=True,
        prompt_template=None,
        max_prompt_tokens=None,
        prefix="",
    ):
        from transformers import AutoConfig, AutoTokenizer, Qwen2VLForConditionalGeneration

        path = Path(path)
        if not path.is_dir():
            raise RewardError(f"VideoAlign: no checkpoint directory at {path}")
        meta = json.loads(_need(path / "model_config.json", "model_config.json").read_text())
        mcfg, lcfg = meta.get("model_config", {}), meta.get("peft_lora_config", {}) or {}
        base = self._base_dir(path, base_model, mcfg)
        ckpt = _find_checkpoint(path, checkpoint_step)
        self.device, self.dtype = resolve_device(device), DTYPES[dtype]
        self.fps, self.max_pixels, self.min_pixels, self.normalize = fps, max_pixels, min_pixels, normalize
        data = meta.get("data_config", {}) or {}
        if data.get("fps") not in (None, fps) or data.get("max_frame_pixels") not in (None, max_pixels):
            log.warning(
                "VideoAlign: sampling at %s fps / %s px, the checkpoint was trained with %s / %s",
                fps,
                max_pixels,
                data.get("fps"),
                data.get("max_frame_pixels"),
            )
        inference = meta.get("inference_config") or {}
        self.norm = {
            d: (
                float(inference.get(f"{d.upper()}_mean", PUBLISHED_NORM[d][0])),
                float(inference.get(f"{d.upper()}_std", PUBLISHED_NORM[d][1])),
            )
            for d in DIMENSIONS
        }

        # Tokenizer with the reward tokens, chat template, prompt template.
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        missing = [t for t in REWARD_TOKENS if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        self.reward_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in REWARD_TOKENS]
        self.chat_template = self._chat_template(base)
        self.template = self._prompt_template(path, prompt_template)
        self.max_prompt_tokens = max_prompt_tokens or 512
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        # Vision preprocessing constants.
        pre = {}
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (base / name).is_file():
                pre = json.loads((base / name).read_text())
                break
        self.patch = int(pre.get("patch_size", 14))
        self.temporal = int(pre.get("temporal_patch_size", 2))
        self.merge = int(pre.get("merge_size", 2))
        self.mean = tuple(pre.get("image_mean", CLIP_MEAN))
        self.std = tuple(pre.get("image_std", CLIP_STD))

        # The model: the base architecture, vocabulary resized, then the reward checkpoint.
        config = AutoConfig.from_pretrained(str(base))
        text_cfg = getattr(config, "text_config", config)
        self.video_token_id = config.video_token_id
        self.video_token = self.tokenizer.convert_ids_to_tokens(self.video_token_id)
        full = [ckpt / "model.pth", ckpt / "model.safetensors"]
        full = next((f for f in full if f.is_file()), None)
        if full is not None:
            # The whole model is in the checkpoint: it is built with its parameters on the meta device
            # (no memory, no initialisation) and given the file's tensors in the serving dtype below.
            # Built in float32 and cast afterwards, the 2B model would take 8.8 GB for a moment beside
            # the checkpoint's own copy. The vocabulary is the resized one (len(tokenizer)).
            from common.model.loading import parameters_on_meta

            state = translate_keys(_load_state(full, mmap=True))
            config = copy.deepcopy(config)
            getattr(config, "text_config", config).vocab_size = len(self.tokenizer)
            with parameters_on_meta():
                model = Qwen2VLForConditionalGeneration._from_config(config, dtype=self.dtype)
        else:
            lora_file = _need(ckpt / "adapter_model.safetensors", "model.pth or adapter_model.safetensors")
            non_lora = _load_state(_need(ckpt / "non_lora_state_dict.pth", "non_lora_state_dict.pth"))
            # Merged in float32 matrix by matrix (merge_lora), kept in the serving dtype.
            model = Qwen2VLForConditionalGeneration.from_pretrained(str(base), dtype=self.dtype)
            model.resize_token_embeddings(len(self.tokenizer))
            state = merge_lora(
                model.state_dict(),
                _load_state(lora_file),
                non_lora,
                float(lcfg.get("lora_alpha", 16)),
                int(lcfg.get("lora_r", 8)),
                bool(lcfg.get("use_rslora", False)),
            )
        head = state.pop("rm_head.weight", None)
        if head is None:
            raise RewardError(f"VideoAlign: {ckpt} has no rm_head.weight")
        out_dim = int(mcfg.get("output_dim", head.shape[0]))
        if head.shape != (out_dim, text_cfg.hidden_size) or out_dim not in (1, 3):
            raise RewardError(
                f"VideoAlign: rm_head.weight has shape {tuple(head.shape)}, expected "
                f"({out_dim}, {text_cfg.hidden_size}) with output_dim 1 or 3"
            )
        embed = state.get("model.language_model.embed_tokens.weight")
        if embed is not None and embed.shape[0] != len(self.tokenizer):
            raise RewardError(
                f"VideoAlign: checkpoint vocabulary {embed.shape[0]} != tokenizer {len(self.tokenizer)} "
                "(is base_model the Qwen2-VL the reward model was trained from?)"
            )
        state.pop("lm_head.weight", None)  # unused (the decoder's hidden states are read), often tied
        if full is not None:
            # assign: the parameters become these tensors. One already in the serving dtype is used as
            # it is (a view of the mapped file, copy-on-write: no second copy); others are converted.
            state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
        result = model.load_state_dict(state, strict=False, assign=full is not None)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if k != "lm_head.weight"]
        if unexpected or missing:
            raise RewardError(
                f"VideoAlign: checkpoint {ckpt} does not fit the base architecture: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        self.model = model.model.to(self.device, self.dtype).eval()  # the decoder; lm_head is not used
        del model
        self.head = torch.nn.Linear(text_cfg.hidden_size, out_dim, bias=False)
        self.head.weight.data.copy_(head.float())
        self.head = self.head.to(self.device, self.dtype).eval()
        self.prefix = prefix
        self.components = [prefix + c for c in ("vq", "mq", "ta", "overall", "vq_raw", "mq_raw", "ta_raw")]

    # -- loading helpers -----------------------------------------------------------------------

    @staticmethod
    def _base_dir(path: Path, base_model, mcfg: dict) -> Path:
        candidates = [Path(base_model)] if base_model else [path / "base"]
        if not base_model and mcfg.get("model_name_or_path"):
            candidates.append(Path(mcfg["model_name_or_path"]))
        for c in candidates:
            if (c / "config.json").is_file():
                return c
        raise RewardError(
            f"VideoAlign: base Qwen2-VL directory not found (tried {[str(c) for c in candidates]}); "
            "set `base_model:` to a local Qwen2-VL-2B-Instruct directory (nothing is downloaded)"
        )

    def _chat_template(self, base: Path) -> str:
        jinja = base / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        js = base / "chat_template.json"
        if js.is_file():
            return json.loads(js.read_text())["chat_template"]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.chat_template
        log.warning("VideoAlign: %s has no chat template; using Qwen2-VL's chat format", base)
        return FALLBACK_CHAT_TEMPLATE

    @staticmethod
    def _prompt_template(path: Path, template) -> str:
        file = Path(template) if template else path / "prompt_template.txt"
        if file.is_file():
            text = file.read_text()
        elif template:
            raise RewardError(f"VideoAlign: prompt template {file} not found")
        else:
            warnings.warn(
                "VideoAlign: no prompt_template.txt in the checkpoint directory; using the built-in "
                "template (scores of the released model depend on the training template's text)",
                stacklevel=3,
            )
            text = BUILTIN_TEMPLATE
        missing = [t for t in ("{text_prompt}", *REWARD_TOKENS) if t not in text]
        if missing:
            raise RewardError(f"VideoAlign: prompt template {file} lacks {missing}")
        return text

    # -- scoring -------------------------------------------------------------------------------

    def sample_frames(self, frames: torch.Tensor, fps: float) -> torch.Tensor:
        """uint8 [F, H, W, 3] -> resized float frames [T, 3, h, w] (uint8 values), T a multiple of 2."""
        idx = fps_frame_indices(frames.shape[0], fps, self.fps, frame_factor=self.temporal)
        x = frames[idx].permute(0, 3, 1, 2).float()
        factor = self.patch * self.merge
        h, w = smart_resize(x.shape[2], x.shape[3], factor, self.min_pixels, self.max_pixels)
        if (h, w) != tuple(x.shape[2:]):
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255)
        return x

    def _text(self, prompt: str, video_tokens: int) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompt = self.tokenizer.decode(truncate_tokens(ids, self.max_prompt_tokens, "VideoAlign"))
        for token in REWARD_TOKENS:  # a prompt must not smuggle in a reward token
            prompt = prompt.replace(token, "")
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": "<frames>"},
                    {"type": "text", "text": self.template.format(text_prompt=prompt)},
                ],
            }
        ]
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        if text.count(self.video_token) != 1:
            raise RewardError(f"VideoAlign: the chat template produced {text.count(self.video_token)} video slots")
        text = text.replace(self.video_token, self.video_token * video_tokens)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def score(self, frames: torch.Tensor, prompts: list[str], fps: float) -> dict[str, torch.Tensor]:
        pixels, grids, sequences = [], [], []
        for video, prompt in zip(frames, prompts, strict=True):
            x = self.sample_frames(video, fps)
            values, grid = patchify(x, self.patch, self.temporal, self.merge, self.mean, self.std)
            pixels.append(values)
            grids.append(grid)
            sequences.append(self._text(prompt, grid[0] * grid[1] * grid[2] // self.merge**2))
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):  # right padding, as VideoAlign
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        positions = []
        for i in range(len(sequences)):
            row = []
            for tid, token in zip(self.reward_ids, REWARD_TOKENS, strict=True):
                where = (ids[i] == tid).nonzero().flatten()
                if len(where) != 1:
                    raise RewardError(f"VideoAlign: {token} occurs {len(where)} times in the input of video {i}")
                row.append(int(where[0]))
            positions.append(row)
        dev = self.device
        out = self.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            pixel_values_videos=torch.cat(pixels).to(dev, self.dtype),
            video_grid_thw=torch.tensor(grids, dtype=torch.long, device=dev),
            mm_token_type_ids=((ids == self.video_token_id).int() * 2).to(dev),
            use_cache=False,
        )
        hidden = out.last_hidden_state
        rows = torch.arange(len(sequences), device=dev)[:, None]
        at = hidden[rows, torch.tensor(positions, device=dev)]  # [B, 3, D]
        logits = self.head(at).float()  # [B, 3, out_dim]
        raw = logits[:, :, 0] if logits.shape[-1] == 1 else logits.diagonal(dim1=1, dim2=2)  # [B, 3]
        raw = raw.cpu()
        result = {}
        for k, d in enumerate(DIMENSIONS):
            mean, std = self.norm[d]
            result[self.prefix + d + "_raw"] = raw[:, k]
            result[self.prefix + d] = (raw[:, k] - mean) / std if self.normalize else raw[:, k]
        result[self.prefix + "overall"] = sum(result[self.prefix + d] for d in DIMENSIONS)
        return result

    def frame_shape(self, num_frames: int, height: int, width: int, fps: float) -> tuple[int, int, int]:
        """(sampled frames, height, width) a clip of this size becomes."""
        n = len(fps_frame_indices(num_frames, fps, self.fps, frame_factor=self.temporal))
        h, w = smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)
        return n, h, w
