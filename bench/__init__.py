"""Benchmarks: scripts that print figures and ratios (`python -m bench.<name> --help`)."""

from __future__ import annotations

import argparse
import sys

from common.config import load_config_for_cli


def toy_bench_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The command line every toy-world bench shares: --config, --json and dotted overrides; the
    bench adds its own options."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/toy.yaml")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. sampler.shift=1.0")
    return parser


def load_toy_config(name: str, path: str, overrides: list[str]):
    """The config for a bench that scores with the toy world's rewards, or None (after saying why on
    stderr) when it is invalid or not a toy-world config."""
    cfg = load_config_for_cli(path, overrides)
    if cfg is not None and cfg.model.text_encoder_kind != "toy":
        print(
            f"{path}: model.text_encoder_kind is {cfg.model.text_encoder_kind!r}; {name} scores with the toy "
            f"rewards and needs a toy-world config (model.text_encoder_kind: toy)",
            file=sys.stderr,
        )
        return None
    return cfg
