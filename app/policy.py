"""Routing policy: every job is routed stream, batch or reject by declared rules.

This module is the interface the endpoints call. The rule engine (sluice.toml [policy],
reload, explain) and admission control live behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RouteRequest:
    """What the policy may look at for one incoming job."""

    endpoint: str  # "/v1/chat/completions", "/v1/jobs", "/v1/document-batches", "/v1/batches"
    tenant_id: str
    tenant_name: str
    model: str
    requested_mode: str = "auto"  # "auto" | "stream" | "batch"
    stream: bool | None = None  # the chat body's `stream` flag, where there is one
    prefer_async: bool = False  # `Prefer: respond-async` (RFC 7240)
    input_tokens: int = 0  # estimated
    priority: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """The decision: a mode (or reject), the rule that made it and why."""

    mode: str  # "stream" | "batch" | "reject"
    rule: str
    reason: str
    status: int = 400  # for reject
    message: str = ""  # for reject
    on_disconnect: str = "detach"  # "detach" | "cancel"
    overflow: str = "reject"  # when no stream slot: "reject" | "queue" | "batch"
    queue_timeout: float = 0.0


def decide(request: RouteRequest) -> Route:
    """The built-in default: batch endpoints and asked-for batch go to batch, the rest streams."""
    if request.endpoint in ("/v1/document-batches", "/v1/batches"):
        return Route("batch", "batch-endpoints", f"{request.endpoint} is a batch endpoint")
    if request.requested_mode == "batch":
        return Route("batch", "requested-mode", "the client asked for mode=batch")
    return Route("stream", "interactive-default", "interactive request")
