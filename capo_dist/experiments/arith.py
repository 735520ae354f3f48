"""Experiments on generated arithmetic word problems.

`sft` builds (or finds in the cache) the warm-started tiny policy of
`capo_dist.warmstart` and prints where it is and its held-out figures:

    python -m capo_dist.experiments.arith sft [--steps 600] [--flaw-rate 0.3] ...

Every scalar field of `WarmStartConfig` and of its `TinyModelSpec` is an option
(`--train-size`, `--lucky-share`, …; the model's as `--model-hidden-size`,
`--model-num-hidden-layers`, …).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from capo_dist.config import DataConfig
from capo_dist.models import TinyModelSpec
from capo_dist.warmstart import META_FILE, WarmStartConfig, warm_start


def _add_fields(parser: argparse.ArgumentParser, defaults: object, prefix: str = "") -> None:
    """One `--<prefix>field-name` option per scalar field of the dataclass instance
    `defaults` (dest `<prefix>field_name`), defaulting to its value there."""
    for f in dataclasses.fields(defaults):
        default = getattr(defaults, f.name)
        if isinstance(default, bool | int | float | str):
            parser.add_argument(
                "--" + (prefix + f.name).replace("_", "-"),
                type=type(default),
                default=default,
                help=f"(default {default})",
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen experiment; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m capo_dist.experiments.arith", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sft = sub.add_parser(
        "sft", help="build the warm-started tiny policy and print its eval figures"
    )
    sft.add_argument(
        "--out-dir",
        type=Path,
        default=Path.home() / ".cache" / "capo_dist" / "models",
        help="cache root; the policy goes to OUT_DIR/warm-<hash>",
    )
    sft.add_argument("--prompt-template", default=DataConfig.prompt_template)
    _add_fields(sft, WarmStartConfig())
    _add_fields(sft, WarmStartConfig().spec, prefix="model_")
    args = vars(parser.parse_args(argv))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = TinyModelSpec(
        **{f.name: args["model_" + f.name] for f in dataclasses.fields(TinyModelSpec)}
    )
    cfg = WarmStartConfig(
        spec=spec,
        **{f.name: args[f.name] for f in dataclasses.fields(WarmStartConfig) if f.name != "spec"},
    )
    path = warm_start(args["out_dir"], cfg, args["prompt_template"])
    meta = json.loads((path / META_FILE).read_text())
    print(json.dumps({"model": str(path), "train": meta["train"], "eval": meta["eval"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
