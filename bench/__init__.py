"""Benchmarks: scripts that print figures and ratios (`python -m bench.<name> --help`)."""

from __future__ import annotations

import sys

from common.config import load_config_for_cli


def load_toy_config(prog: str, path: str, overrides: list[str]):
    """The config for a bench that scores with the toy world's rewards, or None (after saying why on
    stderr) when it is invalid or not a toy-world config."""
    cfg = load_config_for_cli(path, overrides)
    if cfg is not None and cfg.model.text_encoder_kind != "toy":
        print(f"{path}: model.text_encoder_kind is {cfg.model.text_encoder_kind!r}; {prog} scores with the toy "
              f"rewards and needs a toy-world config (model.text_encoder_kind: toy)", file=sys.stderr)
        return None
    return cfg
