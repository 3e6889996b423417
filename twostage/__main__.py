"""``python -m twostage`` runs the CLI."""

from __future__ import annotations

from twostage.cli import cli

cli(prog_name="twostage")
