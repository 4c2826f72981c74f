"""Export a finished run's aligned policy, W_base + dW_semi + s dW_on, as one LoRA adapter (and, with
--fuse, as a plain transformer with the delta added), with a model card.

    python -m cluster.export --run runs/demo
    python -m cluster.export --run runs/demo --scale 0.4 --out exports/demo --fuse

The run folder must hold adapters/semi and adapters/on_policy and config.yaml (cluster.train writes
them). The scale is --scale, else summary.json's "merge_scale" (the scale the run chose); the model
card's scores table comes from summary.json's "scores" when it has them. Writes <out> (default
<run>/export): pytorch_lora_weights.safetensors, transformer/ with --fuse, model_card.md,
config.yaml, export.json; learner/export.py describes them. Then generate with it:

    python -m cluster.generate --config runs/demo/export/config.yaml --adapter runs/demo/export --prompts p.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a run folder (adapters/, config.yaml, summary.json)")
    parser.add_argument("--scale", type=float, default=None, help="merge scale s (default: summary.json merge_scale)")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: <run>/export)")
    parser.add_argument("--fuse", action="store_true", help="also write the fused transformer (no LoRA)")
    args = parser.parse_args(argv)

    from common.config import ConfigError, load_config
    from common.model.adapters import AdapterError
    from common.model.loading import CheckpointError
    from learner.export import ExportError, adapter_dirs, export_policy, read_summary, summary_scale

    try:
        adapter_dirs(args.run)  # a folder without adapters is refused before the config or the model
        config_path = args.run / "config.yaml"
        if not config_path.is_file():
            raise ExportError(f"{args.run}: no config.yaml (the resolved config cluster.train writes)")
        config = load_config(config_path)
        scale = args.scale if args.scale is not None else summary_scale(args.run)
        scores = read_summary(args.run).get("scores")
        out = export_policy(config, args.run, scale, args.out or args.run / "export", fuse=args.fuse, scores=scores)
    except (ExportError, ConfigError, AdapterError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "export.json").read_text(encoding="utf-8"))
    print(json.dumps({"out": str(out), "merge_scale": scale, "rank": manifest["rank"], "fused": args.fuse}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
