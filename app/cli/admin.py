"""Operator commands: database migrations and API keys."""

from __future__ import annotations

import click
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from app.cli.context import make_app


@click.group("db")
def db_group() -> None:
    """Database schema migrations (Alembic)."""


def _run_migration(action: str, revision: str) -> None:
    import flask_migrate

    app = make_app()
    with app.app_context():
        try:
            getattr(flask_migrate, action)(revision=revision)
        except OperationalError as exc:
            raise click.ClickException(f"database unavailable: {exc.orig}") from None


@db_group.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Upgrade the schema to REVISION (default: head)."""
    _run_migration("upgrade", revision)


@db_group.command("downgrade")
@click.argument("revision", default="-1")
def db_downgrade(revision: str) -> None:
    """Downgrade the schema to REVISION (default: one step back; 'base' for empty)."""
    _run_migration("downgrade", revision)


@db_group.command("current")
def db_current() -> None:
    """Print the current schema revision."""
    import flask_migrate

    app = make_app()
    with app.app_context():
        flask_migrate.current()


@click.group("keys")
def keys_group() -> None:
    """Create, list and revoke API keys."""


@keys_group.command("create")
@click.option("--tenant", required=True, help="Tenant name; created if new.")
@click.option("--admin", is_flag=True, help="Allow admin endpoints.")
@click.option("--name", default=None, help="A label for the key.")
def keys_create(tenant: str, admin: bool, name: str | None) -> None:
    """Create a key and print it alone on stdout (it is shown only once)."""
    from app.auth import create_key

    app = make_app()
    with app.app_context():
        _, plaintext = create_key(tenant, admin=admin, name=name)
    click.echo(plaintext)


@keys_group.command("list")
def keys_list() -> None:
    """List keys (prefix only; keys are stored hashed)."""
    from app.extensions import db
    from app.models import ApiKey, Tenant

    app = make_app()
    with app.app_context():
        rows = db.session.execute(
            select(ApiKey, Tenant.name).join(Tenant).order_by(ApiKey.id)
        ).all()
        click.echo(f"{'ID':<32} {'TENANT':<20} {'PREFIX':<18} {'ADMIN':<6} STATUS")
        for key, tenant in rows:
            status = "revoked" if key.revoked_at else "active"
            admin = "yes" if key.is_admin else "no"
            click.echo(f"{key.id:<32} {tenant:<20} {key.prefix + '…':<18} {admin:<6} {status}")


@keys_group.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke the key with KEY_ID (see `sluice keys list`)."""
    from app.auth import revoke_key

    app = make_app()
    with app.app_context():
        if not revoke_key(key_id):
            raise click.ClickException(f"no API key with id {key_id!r}")
    click.echo(f"revoked {key_id}", err=True)
