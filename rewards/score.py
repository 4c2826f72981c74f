"""Score existing videos with the configured reward models, before training on them.

    python -m rewards.score --config configs/x.yaml videos/*.mp4 --prompts prompts.txt [--json out.json]
        [--batch 4] [overrides ...]

`prompts.txt` holds one prompt per line, in the order of the videos (blank lines are skipped).
Each video is scored at its own frame rate. Prints one line per video (every component and the
weighted total of `rewards.terms`) and per-component statistics; `--json` writes them too.
Exit codes: 0 all scored, 1 some videos failed (named, the others still scored), 2 bad input
(config, prompt count, no videos).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"prompts file {path} not found")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score_files(models, videos: list[Path], prompts: list[str]) -> tuple[list[dict], list[str]]:
    """One row per video ({video, prompt, fps, frames, <component>: value}) and error lines."""
    from common.video import read_mp4
    from rewards.server import score_batch

    rows, errors = [], []
    for path, prompt in zip(videos, prompts, strict=True):
        try:
            frames, fps = read_mp4(path)
            scores = score_batch(models, frames[None], [prompt], fps=fps)
        except Exception as exc:  # one bad video must not stop the others
            errors.append(f"{path}: {exc}")
            continue
        rows.append(
            {
                "video": str(path),
                "prompt": prompt,
                "fps": fps,
                "frames": int(frames.shape[0]),
                **{k: v.item() for k, v in scores.items()},
            }
        )
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (rewards.models, rewards.terms)")
    parser.add_argument("--prompts", required=True, type=Path, help="one prompt per line, in video order")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores here")
    parser.add_argument("items", nargs="*", help="mp4 files, then optional dotted overrides (key=value)")
    args = parser.parse_intermixed_args(argv)

    from common.config import load_config_for_cli
    from common.errors import RewardError
    from rewards.combine import RewardCombiner, component_stats
    from rewards.registry import build_models

    overrides = [x for x in args.items if "=" in x and not x.lower().endswith(".mp4")]
    videos = [Path(x) for x in args.items if x not in overrides]
    if not videos:
        print("error: no videos given", file=sys.stderr)
        return 2
    try:
        prompts = read_prompts(args.prompts)
    except (ValueError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(prompts) != len(videos):
        print(
            f"error: {len(videos)} videos but {len(prompts)} prompts in {args.prompts} "
            "(one prompt per line, in the order of the videos)",
            file=sys.stderr,
        )
        return 2
    config = load_config_for_cli(args.config, overrides)
    if config is None:
        return 2
    try:
        models = build_models(config, remote=False)
        combiner = RewardCombiner.from_config(config)
    except RewardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, errors = score_files(models, videos, prompts)
    for row in rows:
        comps = {k: torch.tensor([row[k]]) for m in models for k in m.components}
        row["total"] = combiner.total(comps).item()
        shown = " ".join(f"{k}={row[k]:.4f}" for m in models for k in m.components)
        print(f"{row['video']}: total={row['total']:.4f} {shown}")
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    names = [k for m in models for k in m.components] + ["total"]
    stats = component_stats({k: torch.tensor([r[k] for r in rows]) for k in names}, combiner.weights) if rows else {}
    for k, s in stats.items():
        print(
            f"  {k}: mean {s['mean']:.4f} std {s['std']:.4f} min {s['min']:.4f} max {s['max']:.4f}"
            + (f" weight {s['weight']:g}" if "weight" in s else "")
        )
    if args.json:

        def clean(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x

        payload = {
            "videos": rows,
            "errors": errors,
            "stats": {k: {a: clean(b) for a, b in s.items()} for k, s in stats.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
