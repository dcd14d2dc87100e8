"""The ``cascade-routing`` console script. Each stage registers its own subcommands.

Every subcommand is a thin wrapper over a public Python function of the same name, so the CLI
and the Python API agree.
"""

from __future__ import annotations

import argparse
import sys

from cascade_routing.cli import data_commands, engine_commands, estimator_commands, serving_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade-routing",
        description="Routing, cascading and cascade routing among LLMs under a cost budget.",
    )
    from cascade_routing import __version__

    parser.add_argument("--version", action="version", version=f"cascade-routing {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data_commands, engine_commands, estimator_commands, serving_commands):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["train"]:  # a pass-through to LightningCLI: its own options, --help included
        args = argparse.Namespace(func=estimator_commands.train_passthrough, cli_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Library errors carry a message naming the problem; show it without a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
