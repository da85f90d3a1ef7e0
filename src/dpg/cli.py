"""The `dpg` command.

    dpg attribute [CONFIG.yaml] [key=value ...]   per-example metagradient scores of a data file
    dpg check     [CONFIG.yaml] [key=value ...]   the engine against finite differences (fp64)

Every command takes an optional YAML config and dotted overrides; `dpg COMMAND --help`
lists every key with its default and meaning.
"""

from __future__ import annotations

import argparse
import sys

from dpg.config import describe, load_config
from dpg.errors import DpgError

COMMANDS = {
    "attribute": "score each example of a data file by its exact effect on the target metric",
    "check": "verify the engine against central finite differences in fp64 on your model and recipe",
}


def _config_class(command: str):
    if command == "attribute":
        from dpg.attribute import AttributeConfig

        return AttributeConfig
    from dpg.check import CheckConfig

    return CheckConfig


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dpg", description="Dataset Policy Gradient.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", nargs="?", help="YAML config file (optional)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. recipe.lr=1e-4")
        p.epilog = _keys_help(_config_class(name))
    args = parser.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no YAML file, only overrides
        config, overrides = None, [config, *overrides]
    try:
        cfg = load_config(_config_class(args.command), config, overrides)
        if args.command == "attribute":
            from dpg.attribute import run_attribute

            run_attribute(cfg)
            return 0
        from dpg.check import run_check

        return 0 if run_check(cfg) else 1
    except DpgError as err:
        print(f"dpg {args.command}: error: {err}", file=sys.stderr)
        return 2


def _keys_help(cls) -> str:
    rows = describe(cls)
    width = max(len(k) + len(d) for k, d, _ in rows) + 3
    lines = ["config keys (YAML or key=value):"]
    for key, default, comment in rows:
        lines.append(f"  {key}={default}".ljust(width + 3) + f"  {comment}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
