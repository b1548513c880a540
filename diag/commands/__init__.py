"""Subcommands of the ``diag`` CLI; each module exposes ``register(subparsers)``."""
