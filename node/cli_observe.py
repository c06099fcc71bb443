"""Subcommands that look at runs: `rdu trace`, `rdu plot`, `rdu dash`."""

from __future__ import annotations

import argparse

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands on the `rdu` parser."""
