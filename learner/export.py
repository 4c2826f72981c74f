"""The aligned model as one artefact: W_base + dW_semi + s dW_on (docs/method.md section 5) folded into
a single LoRA adapter, or into the transformer's weights themselves.

    python -m cluster.export --run runs/demo [--scale S] [--out DIR] [--fuse]     (the command line)
    export_policy(config, run_dir, scale, out_dir, fuse=False, scores=None)      (this module)

The fold is exact, not a re-fit. Per target layer each adapter adds c B A x (c = alpha / rank), so

    dW_semi + s dW_on = c_semi B_semi A_semi + s c_on B_on A_on = [c_semi B_semi, s c_on B_on] [A_semi; A_on]

which is one LoRA of rank r_semi + r_on whose B is the scaled columns side by side, whose A is the
rows stacked, and whose alpha equals its rank (scaling 1). It is written as save_adapter writes an
adapter (diffusers' Wan LoRA file, rank and alpha in its metadata), so `adapters.load_adapter`,
`transformer.load_lora_adapter(dir)` and `WanPipeline.load_lora_weights(dir)` all take it.

The export folder (default runs/<name>/export):
    pytorch_lora_weights.safetensors   the folded adapter
    transformer/                       with fuse: the base with the delta added, diffusers layout
                                       (config.json + safetensors; load it as model.diffusers_transformer)
    model_card.md                      base checkpoint, method, scale, what was folded, scores, config
    config.yaml                        the resolved config the export was made with
    export.json                        the same facts for programs (scale, rank, sources)
The folder is written whole beside its destination and renamed into place (common/durable.py).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from common.durable import fsync_file, replace_directory
from common.model import adapters
from common.model.loading import load_policy

if TYPE_CHECKING:
    from common.config import Config

FUSED_DIR = "transformer"
MODEL_CARD = "model_card.md"
MANIFEST = "export.json"
CONFIG_FILE = "config.yaml"
FORMAT = "arcopo-export/1"
METHOD_DOC = "docs/method.md"


class ExportError(ValueError):
    """A run folder, scale or destination that cannot be exported; the message names the file."""


# ---------------------------------------------------------------------------------------------
# The fold
# ---------------------------------------------------------------------------------------------


def _lora_layers(model, name: str) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


def _adapter_scaling(layer, name: str) -> float:
    # From rank and alpha, not `layer.scaling`: merge_adapters has multiplied the on-policy adapter's
    # scaling by the last merge scale, and folding that in again would apply s twice.
    r, alpha = layer.r[name], layer.lora_alpha[name]
    return alpha / math.sqrt(r) if layer.use_rslora.get(name, False) else alpha / r


def _refuse_unfoldable(layer, where: str, name: str) -> None:
    if layer.use_dora.get(name, False) or name in getattr(layer, "lora_variant", {}):
        raise ExportError(f"adapter {name!r} at {where}: a DoRA/variant adapter is not a plain B A; cannot fold it")
    if not isinstance(layer.lora_A[name], torch.nn.Linear) or layer.lora_B[name].bias is not None:
        raise ExportError(f"adapter {name!r} at {where}: only bias-free Linear LoRA layers can be folded")


def fold_adapters(
    model, scale: float, semi: str = adapters.SEMI, on_policy: str = adapters.ON_POLICY
) -> tuple[dict[str, torch.Tensor], dict]:
    """dW_semi + scale * dW_on of `model`'s two adapters as one LoRA: (state dict keyed as
    `adapters.adapter_state_dict` keys it, float32; peft LoraConfig fields for the file's metadata)."""
    semi_layers, on_layers = _lora_layers(model, semi), _lora_layers(model, on_policy)
    if not semi_layers or not on_layers:
        raise ExportError(f"the model lacks adapter {semi!r} or {on_policy!r}")
    if semi_layers.keys() != on_layers.keys():
        only = sorted(semi_layers.keys() ^ on_layers.keys())
        raise ExportError(f"adapters {semi!r} and {on_policy!r} target different layers (e.g. {only[:3]})")
    state: dict[str, torch.Tensor] = {}
    ranks = set()
    for where, layer in semi_layers.items():
        for name in (semi, on_policy):
            _refuse_unfoldable(layer, where, name)
        a = [layer.lora_A[n].weight.detach().float() for n in (semi, on_policy)]
        b = [layer.lora_B[n].weight.detach().float() for n in (semi, on_policy)]
        weights = (_adapter_scaling(layer, semi), scale * _adapter_scaling(layer, on_policy))
        state[f"{where}.lora_A.weight"] = torch.cat(a, dim=0).cpu().contiguous()
        state[f"{where}.lora_B.weight"] = torch.cat([w * m for w, m in zip(weights, b, strict=True)], 1).cpu()
        ranks.add(a[0].shape[0] + a[1].shape[0])
    if len(ranks) != 1:
        raise ExportError(f"adapters of different ranks per layer ({sorted(ranks)}): the folded file needs one rank")
    rank = ranks.pop()
    metadata = model.peft_config[on_policy].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    # alpha = rank: the fold's scales are inside B already, so the file's own scaling must be 1.
    metadata.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={}, lora_dropout=0.0)
    return state, metadata


def write_lora_file(state: dict[str, torch.Tensor], metadata: dict, directory: Path) -> Path:
    """Write a LoRA state dict as save_adapter writes an adapter (keys prefixed `transformer.`, the
    peft config in the metadata) into an existing `directory`, fsynced."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    WanLoraLoaderMixin.save_lora_weights(
        directory, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
    )
    path = Path(directory) / adapters.LORA_FILE
    fsync_file(path)
    return path


def fuse_into_base(model, folded: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Remove the LoRA layers from `model` and add the folded delta B A to each target's weight, in
    float32 before rounding to the weight's dtype. Returns the plain model (modified in place)."""
    model.unload_lora()  # peft's layers out, every base layer back under its own name
    modules = dict(model.named_modules())
    for key, a in folded.items():
        if not key.endswith(".lora_A.weight"):
            continue
        where = key.removesuffix(".lora_A.weight")
        layer = modules[where]
        b = folded[f"{where}.lora_B.weight"]
        weight = layer.weight
        fused = weight.detach().float() + (b.to(weight.device) @ a.to(weight.device))
        # A new tensor rather than an in-place add: the base may be memory-mapped from its file.
        layer.weight = torch.nn.Parameter(fused.to(weight.dtype), requires_grad=False)
    return model


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------


def adapter_dirs(run_dir: str | Path) -> dict[str, Path]:
    """{adapter name: its folder} of a run folder, refusing one whose adapter files are missing."""
    run_dir = Path(run_dir)
    dirs = {name: run_dir / "adapters" / name for name in (adapters.SEMI, adapters.ON_POLICY)}
    missing = [str(d / adapters.LORA_FILE) for d in dirs.values() if not (d / adapters.LORA_FILE).is_file()]
    if missing:
        raise ExportError(
            f"{run_dir}: not a run folder with trained adapters; missing {', '.join(missing)} "
            "(cluster.train writes them when a run finishes)"
        )
    return dirs


def read_summary(run_dir: str | Path) -> dict:
    """summary.json of a run folder, or {} when there is none."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(summary, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return summary


def summary_scale(run_dir: str | Path) -> float:
    """The merge scale the run chose (summary.json "merge_scale"); ExportError naming the file if none."""
    path = Path(run_dir) / "summary.json"
    scale = read_summary(run_dir).get("merge_scale")
    if scale is None:
        where = f'{path} has no "merge_scale"' if path.is_file() else f"no {path}"
        raise ExportError(f"{where}: give the merge scale with --scale")
    return _check_scale(scale, f'{path} "merge_scale"')


def _check_scale(scale, where: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
        raise ExportError(f"{where}: merge scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


# ---------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------


def _redacted_yaml(config: Config) -> str:
    from common.config import redacted_dump

    return yaml.safe_dump(redacted_dump(config), sort_keys=False)


def base_checkpoint(config: Config) -> str:
    m = config.model
    if m.self_forcing_checkpoint is not None:
        return f"Self-Forcing checkpoint `{m.self_forcing_checkpoint}` (entry `{m.checkpoint_key}`)"
    if m.diffusers_transformer is not None:
        return f"diffusers transformer `{m.diffusers_transformer}`"
    return f"random weights of the configured size (model.seed {m.seed}; no checkpoint named)"


def _score_cell(value, where: str) -> str:
    if value is None:
        return "n/a"
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ExportError(f"{where}: expected [mean, stderr], got {value!r}")
    mean, stderr = value
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.4f} ± {stderr:.4f}" if stderr is not None and math.isfinite(stderr) else f"{mean:.4f}"


def scores_table(scores: list[dict], where: str = "scores") -> list[str]:
    """Markdown rows of {"policy", "in_domain": [mean, stderr], "out_of_domain": [mean, stderr]}."""
    lines = ["| policy | in-domain | out-of-domain |", "| --- | --- | --- |"]
    for i, row in enumerate(scores):
        if not isinstance(row, dict) or "policy" not in row:
            raise ExportError(f"{where}[{i}]: expected {{'policy', 'in_domain', 'out_of_domain'}}, got {row!r}")
        cells = [_score_cell(row.get(k), f"{where}[{i}].{k}") for k in ("in_domain", "out_of_domain")]
        lines.append(f"| {row['policy']} | {cells[0]} | {cells[1]} |")
    return lines


def model_card(
    config: Config,
    run_dir: Path,
    scale: float,
    sources: dict[str, dict],
    rank: int,
    fused: bool,
    scores: list[dict] | None,
) -> str:
    """The card's markdown; `sources` is {adapter name: {"r", "lora_alpha"}} as the files had them."""
    folded = " and ".join(f"{name} rank {s['r']} alpha {s['lora_alpha']:g}" for name, s in sources.items())
    lines = [
        f"# {Path(run_dir).name}: AR-CoPO-aligned streaming video generator",
        "",
        f"- **Base model**: {base_checkpoint(config)}; Self-Forcing's causal Wan transformer"
        f" (common/model/causal_wan.py), run in {config.model.dtype}.",
        "- **Method**: AR-CoPO, contrastive policy optimisation for autoregressive video (arXiv 2603.17461),"
        f" as implemented in this repository ({METHOD_DOC}).",
        f"- **Merge scale**: s = {scale:g}; the weights are W = W_base + dW_semi + {scale:g} dW_on"
        f" ({METHOD_DOC}, section 5).",
        f"- **What was folded**: the semi-on-policy adapter (`{run_dir}/adapters/semi`) at weight 1 and the"
        f" on-policy adapter (`{run_dir}/adapters/on_policy`) at weight {scale:g} ({folded}), into one LoRA of"
        f" rank {rank} and alpha {rank} (scaling 1):"
        " A = [A_semi; A_on], B = [c_semi B_semi, s c_on B_on] with c = alpha / rank. Exact, not refitted.",
        f"- **Files**: `{adapters.LORA_FILE}` (diffusers Wan LoRA; `transformer.load_lora_adapter(dir)` or"
        " `WanPipeline.load_lora_weights(dir)`)"
        + (f"; `{FUSED_DIR}/` (the base with the delta added, diffusers layout, no LoRA)" if fused else "")
        + f"; `{CONFIG_FILE}` (the resolved config).",
        "",
        "Generate videos chunk by chunk, decoded as each chunk finishes:",
        "",
        "```bash",
        f"python -m cluster.generate --config <this folder>/{CONFIG_FILE} --adapter <this folder> \\",
        "    --prompts prompts.txt",
        "```",
    ]
    if scores:
        lines += ["", "## Scores", "", *scores_table(scores), "", "Mean ± standard error over the evaluation set."]
    lines += ["", "## Config", "", "```yaml", _redacted_yaml(config).rstrip(), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------


def _refuse_foreign_destination(out_dir: Path, run_dir: Path) -> None:
    # The whole folder is replaced: never one that is not an earlier export (a run folder, a home).
    if out_dir.resolve() == run_dir.resolve() or out_dir.resolve() in run_dir.resolve().parents:
        raise ExportError(f"--out {out_dir} would replace the run folder {run_dir}")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise ExportError(f"{out_dir}: exists, is not empty and has no {MANIFEST}; not replacing it with an export")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    fsync_file(path)


@torch.no_grad()
def export_policy(
    config: Config,
    run_dir: str | Path,
    scale: float,
    out_dir: str | Path,
    fuse: bool = False,
    scores: list[dict] | None = None,
) -> Path:
    """Fold run_dir's two adapters at `scale` into one LoRA file in `out_dir` (with `fuse`, also the
    fused transformer), with model_card.md, config.yaml and export.json. Returns `out_dir`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    scale = _check_scale(scale, "merge scale")
    dirs = adapter_dirs(run_dir)
    _refuse_foreign_destination(out_dir, run_dir)
    if scores:
        scores_table(scores)  # a malformed row fails here, before the model is loaded

    model = load_policy(config)
    with warnings.catch_warnings():
        # peft warns on every adapter after the first; two named adapters are the design here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name, directory in dirs.items():
            adapters.load_adapter(model, directory, name)
    sources = {name: {k: model.peft_config[name].to_dict()[k] for k in ("r", "lora_alpha")} for name in dirs}
    folded, metadata = fold_adapters(model, scale)
    rank = metadata["r"]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_lora_file(folded, metadata, tmp)
        if fuse:
            fused = fuse_into_base(model, folded)
            fused.save_pretrained(tmp / FUSED_DIR, safe_serialization=True)
            for path in (tmp / FUSED_DIR).iterdir():
                fsync_file(path)
        _write_text(tmp / MODEL_CARD, model_card(config, run_dir, scale, sources, rank, fuse, scores))
        _write_text(tmp / CONFIG_FILE, _redacted_yaml(config))
        manifest = {
            "format": FORMAT,
            "run": str(run_dir),
            "merge_scale": scale,
            "rank": rank,
            "alpha": rank,
            "folded": {name: {**sources[name], "weight": 1.0 if name == adapters.SEMI else scale} for name in dirs},
            "lora_file": adapters.LORA_FILE,
            "fused_transformer": FUSED_DIR if fuse else None,
            "base": base_checkpoint(config),
            "dtype": config.model.dtype,
        }
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
