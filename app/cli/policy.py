"""`sluice policy check|explain`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from app.config import TUNABLES, ConfigError
from app.policy import (
    ENDPOINTS,
    Policy,
    default_policy,
    explain,
    parse_policy,
    prefers_async,
    read_policy_file,
    request_from_body,
)


def _settings() -> dict[str, Any]:
    """The tunables the policy reads (POLICY_MAX_INTERACTIVE_TOKENS), from the environment."""
    try:
        from app.config import load_config

        return load_config()
    except ConfigError:
        return {name: default for name, (_kind, default) in TUNABLES.items()}


def _policy_file(path: str | None) -> str | None:
    if path:
        return path
    env = os.environ.get("SLUICE_CONFIG")
    if env:
        return env
    return "sluice.toml" if Path("sluice.toml").is_file() else None


def load_policy(path: str | None) -> Policy:
    """The policy in FILE (or SLUICE_CONFIG, or ./sluice.toml), else the built-in default."""
    file = _policy_file(path)
    settings = _settings()
    if file is None:
        return default_policy(settings)
    try:
        return parse_policy(read_policy_file(file), settings, source=f"{file} [policy]")
    except ConfigError as exc:
        raise click.ClickException(f"invalid policy: {exc}") from None


def _describe(policy: Policy) -> None:
    click.echo(f"policy: {policy.source} ({len(policy.rules)} rules)")
    for i, rule in enumerate(policy.rules, 1):
        extra = ""
        if rule.route == "stream":
            extra = f" overflow={rule.overflow}"
            if rule.queue_timeout:
                extra += f" queue_timeout={rule.queue_timeout:g}s"
            extra += f" on_disconnect={rule.on_disconnect}"
        elif rule.route == "reject":
            extra = f" status={rule.status}"
        click.echo(f"  {i}. {rule.name} -> {rule.route}{extra}")
    limits = [
        f"max_streams={policy.max_streams}" if policy.max_streams is not None else "",
        f"max_streams_per_tenant={policy.max_streams_per_tenant}"
        if policy.max_streams_per_tenant is not None
        else "",
        *(f"tenant {name}={n}" for name, n in policy.tenant_max_streams.items()),
    ]
    if any(limits):
        click.echo("  limits: " + ", ".join(x for x in limits if x))


@click.group("policy")
def policy_group() -> None:
    """Check the routing policy and explain its decisions."""


@policy_group.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
def policy_check(file: str | None) -> None:
    """Validate FILE's [policy] (default: SLUICE_CONFIG or ./sluice.toml)."""
    policy = load_policy(file)
    _describe(policy)
    click.echo("OK")


@policy_group.command("explain")
@click.option(
    "--request",
    "request_file",
    required=True,
    type=click.File("r"),
    help="A JSON request body (POST /v1/jobs or chat); - for stdin.",
)
@click.option(
    "--header", "headers", multiple=True, help="A request header, e.g. 'Prefer: respond-async'."
)
@click.option("--endpoint", default="/v1/jobs", show_default=True, type=click.Choice(ENDPOINTS))
@click.option("--tenant", default="default", show_default=True, help="The tenant's name.")
@click.option("--file", "file", type=click.Path(dir_okay=False), help="The policy file.")
def policy_explain(
    request_file: Any, headers: tuple[str, ...], endpoint: str, tenant: str, file: str | None
) -> None:
    """Print which rule matches a request and why, without running anything."""
    try:
        body = json.load(request_file)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"--request is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise click.ClickException("--request must hold a JSON object")
    prefer = [v for h in headers for k, _, v in [h.partition(":")] if k.strip().lower() == "prefer"]
    policy = load_policy(file)
    req = request_from_body(
        endpoint,
        body,
        tenant_id=tenant,
        tenant_name=tenant,
        prefer_async=any(prefers_async(v) for v in prefer),
    )
    route, verdicts = explain(policy, req)
    click.echo(f"policy: {policy.source}")
    click.echo(
        f"request: {endpoint} model={req.model or '-'} mode={req.requested_mode} "
        f"stream={'-' if req.stream is None else str(req.stream).lower()} "
        f"prefer_async={str(req.prefer_async).lower()} input~{req.input_tokens} tokens "
        f"priority={req.priority} tenant={tenant}"
    )
    for verdict in verdicts:
        mark = "MATCH" if verdict.matched else "skip "
        failed = [desc for ok, desc in verdict.checks if not ok]
        detail = "; ".join(failed) if failed else "; ".join(d for _, d in verdict.checks)
        click.echo(f"  {mark} {verdict.rule}: {detail or 'no conditions'}")
    if not any(v.matched for v in verdicts):
        click.echo(f"  (no rule matched: {route.rule})")
    click.echo(f"route: {route.mode} (rule {route.rule})")
    click.echo(f"reason: {route.reason}")
    if route.mode == "reject":
        click.echo(f"reject: {route.status} {route.message}")
    elif route.mode == "stream":
        click.echo(
            f"stream: overflow={route.overflow} queue_timeout={route.queue_timeout:g}s "
            f"on_disconnect={route.on_disconnect}"
        )
