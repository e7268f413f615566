"""The `sluice` command."""

from __future__ import annotations

from typing import Any

import click
import httpx

from app.cli.admin import db_group, keys_group
from app.cli.batch import results, submit
from app.cli.chat import chat
from app.cli.dev import dev
from app.cli.policy import policy_group
from app.cli.processes import sweeper, web, worker


class SluiceGroup(click.Group):
    """Client commands that cannot reach the server fail with one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except httpx.TransportError as exc:
            raise click.ClickException(
                f"cannot reach Sluice ({exc}); is it running? Set --url or SLUICE_URL."
            ) from None


@click.group(cls=SluiceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sluice")
def main() -> None:
    """Sluice: a job orchestrator for LLM work."""


main.add_command(dev)
main.add_command(db_group)
main.add_command(keys_group)
main.add_command(web)
main.add_command(worker)
main.add_command(sweeper)
main.add_command(chat)
main.add_command(policy_group)
main.add_command(submit)
main.add_command(results)
