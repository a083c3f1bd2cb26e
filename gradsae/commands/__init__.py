"""Subcommands of the ``gradsae`` CLI, one module each (see :mod:`gradsae.cli`)."""
