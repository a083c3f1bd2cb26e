"""The ``gradsae`` command line.

Each subcommand is a module in :mod:`gradsae.commands` that defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; modules are discovered, so adding a command
is adding a file. Errors that are the user's (bad input, missing files) are printed as one line
``gradsae <cmd>: error: ...`` with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import __version__
from .errors import GradSAEError


def _commands() -> dict:
    from . import commands

    out = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        out[getattr(mod, "NAME", info.name)] = mod
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradsae",
        description="Find the SAE latents that drive a language model's output (GradSAE).",
    )
    parser.add_argument("--version", action="version", version=f"gradsae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _commands().items():
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "__doc__", None) or mod.HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (GradSAEError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"gradsae {args._name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradsae {args._name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
