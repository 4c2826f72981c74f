"""Image-preference rewards applied to video frames: CLIP score and PickScore (transformers CLIPModel).

`num_frames` frames are sampled uniformly (first and last included), each scored against the
prompt, and the scores averaged over frames:

  clip:      clip_score = 100 * max(cos(image, text), 0)          (the usual CLIPScore scale)
  pickscore: pickscore  = logit_scale.exp() * cos(image, text)    (PickScore's own definition)

Both load a local Hugging Face CLIP directory (`path`: config.json + weights); the processor
(tokenizer + image preprocessing) comes from `processor` if given, else from `path` (PickScore's
released weights use the CLIP-ViT-H-14 processor, a separate directory). In transformers 5.x
`get_image_features` / `get_text_features` return an output object whose `.pooler_output` is
the projected embedding; older versions return the tensor itself: both are handled.
Prompts longer than the text tower's limit (77 tokens for CLIP) are truncated with a warning.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.errors import RewardError
from rewards.base import DTYPES, RewardModel, resolve_device, truncate_tokens, uniform_frame_indices


def _embedding(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipReward(RewardModel):
    name = "clip"

    def __init__(
        self,
        path,
        processor=None,
        device="cpu",
        dtype="float32",
        num_frames=8,
        kind="clip",
        prefix="",
        max_prompt_tokens=None,
    ):
        from transformers import AutoProcessor, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise RewardError(f"{kind}: no CLIP model directory at {path} (config.json missing)")
        if not any(
            (path / f).is_file()
            for f in (
                "model.safetensors",
                "pytorch_model.bin",
                "model.safetensors.index.json",
                "pytorch_model.bin.index.json",
            )
        ):
            raise RewardError(f"{kind}: no weights (model.safetensors / pytorch_model.bin) in {path}")
        proc_dir = Path(processor) if processor else path
        if not proc_dir.is_dir():
            raise RewardError(f"{kind}: processor directory {proc_dir} not found")
        self.device, self.dtype = resolve_device(device), DTYPES[dtype]
        try:
            self.processor = AutoProcessor.from_pretrained(str(proc_dir))
            self.model = CLIPModel.from_pretrained(str(path), dtype=self.dtype).to(self.device).eval()
        except Exception as exc:
            raise RewardError(f"{kind}: cannot load {path}: {exc}") from None
        self.name, self.kind, self.num_frames = kind, kind, num_frames
        limit = self.model.config.text_config.max_position_embeddings
        self.max_prompt_tokens = min(max_prompt_tokens or limit, limit)
        self.component = prefix + ("clip_score" if kind == "clip" else "pickscore")
        self.components = [self.component]

    def _texts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.processor.tokenizer
        rows = []
        for p in prompts:
            ids = tok(p, add_special_tokens=True)["input_ids"]
            if len(ids) > self.max_prompt_tokens:
                ids = truncate_tokens(ids, self.max_prompt_tokens, self.kind)
                ids[-1] = tok.eos_token_id  # keep the end token CLIP pools at
            rows.append(ids)
        length = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def score(self, frames: torch.Tensor, prompts: list[str], fps: float) -> dict[str, torch.Tensor]:
        b, f = frames.shape[:2]
        idx = uniform_frame_indices(f, self.num_frames)
        images = [img.numpy() for img in frames[:, idx].reshape(b * len(idx), *frames.shape[2:])]
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image = _embedding(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
        text = _embedding(self.model.get_text_features(**self._texts(prompts))).float()
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        cos = (image.reshape(b, len(idx), -1) * text[:, None]).sum(-1)  # [B, frames]
        if self.kind == "clip":
            per_frame = 100.0 * cos.clamp_min(0)
        else:
            per_frame = self.model.logit_scale.exp().float() * cos
        return {self.component: per_frame.mean(1).cpu()}
