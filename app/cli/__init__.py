"""The `sluice` command."""

from __future__ import annotations

import click

from app.cli.admin import db_group, keys_group, worker
from app.cli.batch import results, submit
from app.cli.chat import chat
from app.cli.dev import dev
from app.cli.policy import policy_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sluice")
def main() -> None:
    """Sluice: a job orchestrator for LLM work."""


main.add_command(dev)
main.add_command(db_group)
main.add_command(keys_group)
main.add_command(worker)
main.add_command(chat)
main.add_command(policy_group)
main.add_command(submit)
main.add_command(results)
