"""The ``gradsae`` command line.

Each subcommand is a module in :mod:`gradsae.commands` that defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; modules are discovered, so adding a command
is adding a file.

Errors that are the user's (bad options, bad input, missing or unwritable files, a full disk)
are printed as one line ``gradsae <cmd>: error: ...`` in the command's own option names, with
exit code 2, never as a traceback; warnings as one line ``gradsae <cmd>: warning: ...``.
Ctrl-C prints one line and exits with 130 (a corpus run first writes a checkpoint and says how
to resume).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
import warnings

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``prog: error: ...``), exit 2."""

    def error(self, message):  # noqa: D401 - argparse's interface
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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
    from . import __version__

    parser = _Parser(
        prog="gradsae",
        description="Find the SAE latents that drive a language model's output (GradSAE).",
    )
    parser.add_argument("--version", action="version", version=f"gradsae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, mod in _commands().items():
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "__doc__", None) or mod.HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _name=name, _parser=p)
    return parser


def cli_words(message: str, parser: argparse.ArgumentParser | None) -> str:
    """``message`` in the command's words, on one line: the Python API's ``name=value``
    spellings of the command's options become ``--name value`` (``name=True``: ``--name``),
    and ``(CLI: --name)`` asides are dropped."""
    msg = _one_line(message)
    msg = re.sub(r" \(CLI: [^)]*\)", "", msg)
    if parser is None:
        return msg
    flags = {}
    for a in parser._actions:
        longs = [o for o in a.option_strings if o.startswith("--")]
        if longs and a.dest not in ("help",):
            flags.setdefault(a.dest, longs[0])
    for dest, flag in flags.items():
        d = re.escape(dest)
        msg = re.sub(rf"(?<![\w-]){d}=True\b", flag, msg)
        msg = re.sub(rf"(?<![\w-]){d}=(\.\.\.|<[^>]*>|'[^']*'|[^\s,;:)]+)",
                     lambda m: f"{flag} {m.group(1).strip(chr(39))}", msg)  # name=value: --name value
        msg = re.sub(rf"(?<![\w-]){d}=(?=[\s,;:)]|$)", flag, msg)
        msg = re.sub(rf"(?<![\w./-]){d} must\b", f"{flag} must", msg)  # "context must be ..."
        if "_" in dest:  # a bare API name such as max_length
            msg = re.sub(rf"(?<![\w./-]){d}(?![\w=/]|\.\w)", flag, msg)
    return msg


def main(argv: list[str] | None = None) -> int:
    name, parser = None, None
    try:
        top = build_parser()
        try:
            args, extra = top.parse_known_args(argv)
            if extra:  # reported by the command's own parser, in its name
                (getattr(args, "_parser", None) or top).error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as e:  # --help, --version, and usage errors (already printed)
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        if not getattr(args, "command", None):
            top.print_help()
            return EXIT_USAGE
        name, parser = args._name, args._parser

        def show(message, category, filename, lineno, file=None, line=None):
            print(f"gradsae {name}: warning: {cli_words(str(message), parser)}", file=sys.stderr)

        with warnings.catch_warnings():
            warnings.showwarning = show
            return int(args._run(args) or 0)
    except KeyboardInterrupt as e:
        what = f"gradsae {name}" if name else "gradsae"
        detail = cli_words(str(e), parser) if str(e) else "interrupted"
        print(f"{what}: {detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - user errors are one line; anything else is a bug
        from .errors import GradSAEError

        if not isinstance(e, (GradSAEError, OSError)):
            raise
        if isinstance(e, OSError) and not isinstance(e, GradSAEError) and e.strerror:
            text = f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
        else:
            text = str(e) or type(e).__name__
        print(f"gradsae {name}: error: {cli_words(text, parser)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
