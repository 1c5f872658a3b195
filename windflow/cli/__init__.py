"""The ``windflow`` command line.

Each subcommand lives in its own module under ``windflow.cli`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in help order.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "windflow.cli.up",
    "windflow.cli.serve",
    "windflow.cli.play",
    "windflow.cli.demo",
    "windflow.cli.render",
    "windflow.cli.state",
    "windflow.cli.mesh",
    "windflow.cli.keys",
    "windflow.cli.usage",
    "windflow.cli.status",
    "windflow.cli.sessions",
    "windflow.cli.models",
    "windflow.cli.kernels",
    "windflow.cli.bench",
    "windflow.cli.profile",
    "windflow.cli.plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="windflow", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet on this branch
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
