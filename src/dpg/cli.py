"""The `dpg` command.

    dpg demo      [CONFIG.yaml] [key=value ...]   the built-in default: train, transfer check, report
    dpg train     CONFIG.yaml   [key=value ...]   GRPO on metagradient rewards
    dpg evaluate  CONFIG.yaml   [key=value ...]   transfer check: base vs trained generator
    dpg sample    CONFIG.yaml   [key=value ...]   a dataset from any generator: JSONL / Parquet
    dpg attribute [CONFIG.yaml] [key=value ...]   per-example metagradient scores of a data file
    dpg check     [CONFIG.yaml] [key=value ...]   the engine against finite differences (fp64)

Every command takes an optional YAML config and dotted overrides; `dpg COMMAND --help`
lists every key with its default and meaning.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dpg.config import describe, load_config
from dpg.errors import DpgError

COMMANDS = {
    "demo": "the built-in default: DPG on tiny offline models (CPU, minutes), transfer check, report",
    "train": "train a generator with GRPO on metagradient (or baseline) rewards",
    "evaluate": "transfer check: sample data from base and trained generators, fine-tune a fresh target, measure",
    "sample": "write a dataset: completions from any generator on the config's prompts, as JSONL or Parquet",
    "attribute": "score each example of a data file by its exact effect on the target metric",
    "check": "verify the engine against central finite differences in fp64 on your model and recipe",
}


def _config(command: str):
    """(config class, its defaults) for a command."""
    if command == "attribute":
        from dpg.attribute import AttributeConfig

        return AttributeConfig, AttributeConfig()
    if command == "check":
        from dpg.check import CheckConfig

        return CheckConfig, CheckConfig()
    from dpg.config import TrainConfig

    if command == "demo":
        from dpg.demo import demo_config

        return TrainConfig, demo_config()
    return TrainConfig, TrainConfig()


def _run(command: str, cfg) -> int:
    if command == "attribute":
        from dpg.attribute import run_attribute

        run_attribute(cfg)
    elif command == "check":
        from dpg.check import run_check

        return 0 if run_check(cfg) else 1
    elif command == "train":
        from dpg.train import run_train

        run_train(cfg)
    elif command == "evaluate":
        from dpg.evaluate import run_evaluate

        run_evaluate(cfg)
    elif command == "sample":
        from dpg.sample import run_sample

        run_sample(cfg)
    else:
        run_demo(cfg)
    return 0


def run_demo(cfg) -> Path:
    """dpg demo: dpg train, then dpg evaluate (the transfer check), then the report folder.
    The sequence lives here, in the dispatcher, so that no command imports another."""
    from dpg.demo import demo_report
    from dpg.evaluate import run_evaluate
    from dpg.train import run_train

    start = time.perf_counter()
    run_train(cfg)
    trained = time.perf_counter()
    results = run_evaluate(cfg)
    end = time.perf_counter()
    seconds = {"train": trained - start, "evaluate": end - trained, "total": end - start}
    return demo_report(cfg, results, seconds)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dpg", description="Dataset Policy Gradient.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("config", nargs="?", help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. recipe.lr=1e-4")
        if "--help" in argv or "-h" in argv:  # the key listing costs imports: only when asked
            p.epilog = _keys_help(*_config(name))
    args = parser.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no YAML file, only overrides
        config, overrides = None, [config, *overrides]
    try:
        if config is None and args.command in ("train", "evaluate", "sample"):
            raise DpgError(f"dpg {args.command} needs a config file (see configs/, or `dpg demo` for the built-in run)")
        cls, defaults = _config(args.command)
        return _run(args.command, load_config(cls, config, overrides, base=defaults))
    except DpgError as err:
        print(f"dpg {args.command}: error: {err}", file=sys.stderr)
        return 2


def _keys_help(cls, defaults) -> str:
    rows = describe(cls, defaults=defaults)
    width = max(len(k) + len(d) for k, d, _ in rows) + 3
    lines = ["config keys (YAML or key=value):"]
    for key, default, comment in rows:
        lines.append(f"  {key}={default}".ljust(width + 3) + f"  {comment}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
