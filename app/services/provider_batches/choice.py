"""Which executor runs a batch route: the rule's, else the providers' default, or by deadline."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from flask import current_app

from app.policy import Route
from app.pricing import BATCH_RATIO, price_for, prices_of

PROVIDER_WINDOW = 86_400.0  # the providers' batch APIs finish within 24 hours
BUILTIN_KINDS = {"mock": "mock", "openai": "openai", "anthropic": "anthropic"}


def _table(name: str) -> Mapping[str, Any]:
    tables = current_app.config.get("PROVIDERS") or {}
    table = tables.get(name)
    return table if isinstance(table, Mapping) else {}


def kind_of(name: str) -> str:
    """The provider's kind (mock, openai or anthropic)."""
    return str(_table(name).get("kind") or BUILTIN_KINDS.get(name, "openai"))


def has_batch_api(name: str) -> bool:
    """Whether Sluice can use this provider's batch API.

    The built-ins can; an OpenAI-compatible server only when its table says
    `batch_api = true` (vLLM, Ollama and most local servers have no Batches API).
    """
    kind = kind_of(name)
    if kind in ("mock", "anthropic") or name == "openai":
        return True
    return _table(name).get("batch_api") is True


def default_executor(name: str) -> str:
    """The provider's `batch_executor` (default "workers")."""
    value = _table(name).get("batch_executor", "workers")
    return str(value)


def seconds(value: Any) -> float | None:
    """A deadline as seconds: a number, or "90s" / "30m" / "2h" / "1d"; None if not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value > 0 else None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(value))
    if not match:
        return None
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _shown(s: float) -> str:
    """Seconds as the shortest plain duration: "24h", "3d", "90m", "45s"."""
    if s >= 3 * 86400 and s % 86400 == 0:
        return f"{int(s // 86400)}d"
    for unit, size in (("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{int(s // size)}{unit}"
    return f"{s:g}s"


def resolve(
    route: Route,
    providers: Iterable[str],
    models: Iterable[str],
    window_seconds: float,
    metadata: Mapping[str, Any] | None = None,
) -> Route:
    """The route with `executor` set to "workers" or "provider" (and why, on its reason).

    The rule's executor wins; without one, the providers' `batch_executor` default. A
    provider without a batch API runs on workers. "auto" takes the provider batch when the
    deadline (a `deadline` metadata field, else the completion window) allows 24 hours.
    """
    names = sorted(set(providers))
    wanted = route.executor
    if wanted is None:
        defaults = {default_executor(n) for n in names}
        wanted = defaults.pop() if len(defaults) == 1 else "workers"
    if wanted == "workers":
        return replace(route, executor="workers")
    lacking = [n for n in names if not has_batch_api(n)]
    if lacking:
        why = f"provider {', '.join(lacking)} has no batch API"
        return _with(route, "workers", why)
    discount = _discount(models)
    if wanted == "auto":
        raw = (metadata or {}).get("deadline")
        deadline = seconds(raw) if raw is not None else None
        source = "deadline" if deadline is not None else "completion_window"
        shown = str(raw) if deadline is not None else _shown(window_seconds)
        deadline = deadline if deadline is not None else window_seconds
        if deadline < PROVIDER_WINDOW:
            why = f"{source} {shown} is shorter than the provider batch window 24h"
            return _with(route, "workers", why)
        why = f"{source} {shown} allows provider batch at {discount}"
        return _with(route, "provider", why)
    return _with(route, "provider", f"provider batch API at {discount}")


def _discount(models: Iterable[str]) -> str:
    table = prices_of(current_app.config)
    ratios = {
        round(price.discount() * 100) for m in models if (price := price_for(m, table)) is not None
    }
    ratio = ratios.pop() if len(ratios) == 1 else round(BATCH_RATIO * 100)
    return f"{ratio} %"


def _with(route: Route, executor: str, why: str) -> Route:
    reason = f"{route.reason}; executor {executor}: {why}" if route.reason else why
    return replace(route, executor=executor, reason=reason[:500])
