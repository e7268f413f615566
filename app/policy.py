"""Routing policy: every job is routed stream, batch or reject by declared rules.

The policy is the `[policy]` table of sluice.toml (app.config["POLICY"]), or a built-in
default when there is none. Rules are tried in order; the first whose conditions all hold
decides. `decide(request)` is what the front door service (app/services/front_door.py)
calls; `explain()` shows every rule's verdict for the CLI. The policy reloads on SIGHUP or
when its file changes, keeping the last good one when the new one is invalid.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import threading
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from app.config import TUNABLES, ConfigError
from app.providers import estimate_tokens

log = logging.getLogger(__name__)

ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/jobs",
    "/v1/responses",
    "/v1/document-batches",
    "/v1/batches",
)
INTERACTIVE_ENDPOINTS = ("/v1/chat/completions", "/v1/jobs", "/v1/responses")
BATCH_ENDPOINTS = ("/v1/document-batches", "/v1/batches")
ROUTES = ("stream", "batch", "reject")
REQUESTED_MODES = ("auto", "stream", "batch")
ON_DISCONNECT = ("detach", "cancel")
OVERFLOWS = ("reject", "queue", "batch")
EXECUTORS = ("workers", "provider", "auto")  # who runs a batch route (#13)


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
    budget_left: float | None = None  # USD left of the tenant's daily budget (None: no budget)


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
    prefer_async: bool = False  # the client sent `Prefer: respond-async`
    tenant_max_streams: int | None = None  # this tenant's stream limit, if the policy sets one
    # who runs a batch route: the rule's "workers" | "provider" | "auto", or None (the
    # provider's default); app.services.provider_batches resolves it to workers or provider
    executor: str | None = None

    @property
    def header(self) -> str:
        """The `X-Sluice-Route` header value: `<mode>; rule=<name>`."""
        return f"{self.mode}; rule={self.rule}"


# ---------------------------------------------------------------- conditions


def fmt_tokens(n: int) -> str:
    """48123 -> "48k", 1500 -> "1.5k", 900 -> "900"."""
    if n < 1000:
        return str(n)
    if n < 10_000:
        return f"{n / 1000:.1f}".rstrip("0").rstrip(".") + "k"
    return f"{round(n / 1000)}k"


def _listed(values: tuple[Any, ...]) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class Conditions:
    """A rule's `when` table; every condition that is set must hold."""

    endpoint: tuple[str, ...] | None = None
    mode: tuple[str, ...] | None = None
    stream: bool | None = None
    prefer_async: bool | None = None
    tenant: tuple[str, ...] | None = None
    model: tuple[str, ...] | None = None
    input_tokens_above: int | None = None
    input_tokens_below: int | None = None
    priority: tuple[int, ...] | None = None
    priority_above: int | None = None
    priority_below: int | None = None
    metadata_keys: tuple[str, ...] | None = None
    metadata: dict[str, Any] | None = None
    budget_left_below: float | None = None  # USD left of the tenant's daily budget

    def check(self, req: RouteRequest) -> list[tuple[bool, str]]:
        """(holds, description) for each condition that is set, in declaration order."""
        out: list[tuple[bool, str]] = []
        if self.endpoint is not None:
            ok = any(fnmatch.fnmatchcase(req.endpoint, g) for g in self.endpoint)
            out.append(
                (
                    ok,
                    f"endpoint {req.endpoint}"
                    + ("" if ok else f" not in {_listed(self.endpoint)}"),
                )
            )
        if self.mode is not None:
            ok = req.requested_mode in self.mode
            out.append(
                (
                    ok,
                    f"mode={req.requested_mode} requested"
                    + ("" if ok else f", not {_listed(self.mode)}"),
                )
            )
        if self.stream is not None:
            ok = req.stream is self.stream
            shown = "unset" if req.stream is None else str(req.stream).lower()
            out.append(
                (ok, f"stream={shown}" + ("" if ok else f", not {str(self.stream).lower()}"))
            )
        if self.prefer_async is not None:
            ok = req.prefer_async is self.prefer_async
            said = (
                "client allows async (Prefer: respond-async)"
                if req.prefer_async
                else ("client did not send Prefer: respond-async")
            )
            out.append((ok, said))
        if self.tenant is not None:
            ok = any(
                fnmatch.fnmatchcase(req.tenant_name, g) or fnmatch.fnmatchcase(req.tenant_id, g)
                for g in self.tenant
            )
            out.append(
                (
                    ok,
                    f"tenant {req.tenant_name}" + ("" if ok else f" not in {_listed(self.tenant)}"),
                )
            )
        if self.model is not None:
            hit = next((g for g in self.model if fnmatch.fnmatchcase(req.model, g)), None)
            desc = (
                f"model {req.model} matches {hit}"
                if hit
                else f"model {req.model} not in {_listed(self.model)}"
            )
            out.append((hit is not None, desc))
        tokens = fmt_tokens(req.input_tokens)
        if self.input_tokens_above is not None:
            ok = req.input_tokens > self.input_tokens_above
            op = ">" if ok else "<="
            out.append(
                (ok, f"input ~{tokens} tokens {op} {fmt_tokens(self.input_tokens_above)} limit")
            )
        if self.input_tokens_below is not None:
            ok = req.input_tokens < self.input_tokens_below
            op = "<" if ok else ">="
            out.append((ok, f"input ~{tokens} tokens {op} {fmt_tokens(self.input_tokens_below)}"))
        if self.priority is not None:
            ok = req.priority in self.priority
            out.append(
                (
                    ok,
                    f"priority {req.priority}"
                    + ("" if ok else f" not in {_listed(self.priority)}"),
                )
            )
        if self.priority_above is not None:
            ok = req.priority > self.priority_above
            out.append((ok, f"priority {req.priority} {'>' if ok else '<='} {self.priority_above}"))
        if self.priority_below is not None:
            ok = req.priority < self.priority_below
            out.append((ok, f"priority {req.priority} {'<' if ok else '>='} {self.priority_below}"))
        if self.metadata_keys is not None:
            missing = [k for k in self.metadata_keys if k not in req.metadata]
            desc = (
                f"metadata has {_listed(self.metadata_keys)}"
                if not missing
                else (f"metadata lacks {_listed(tuple(missing))}")
            )
            out.append((not missing, desc))
        if self.metadata is not None:
            wrong = [k for k, v in self.metadata.items() if req.metadata.get(k) != v]
            pairs = ", ".join(f"{k}={v}" for k, v in self.metadata.items())
            desc = f"metadata {pairs}" if not wrong else f"metadata does not have {pairs}"
            out.append((not wrong, desc))
        if self.budget_left_below is not None:
            left = req.budget_left
            ok = left is not None and left < self.budget_left_below
            desc = (
                f"tenant {req.tenant_name} has no budget"
                if left is None
                else f"budget left ${left:.2f} {'<' if ok else '>='} ${self.budget_left_below:g}"
            )
            out.append((ok, desc))
        return out


# ---------------------------------------------------------------- rules and policy


@dataclass(frozen=True)
class Rule:
    """One named rule: conditions and the route they lead to."""

    name: str
    when: Conditions
    route: str
    status: int = 400
    message: str = ""
    reason: str = ""  # a template; "" means: describe the conditions that matched
    on_disconnect: str = "detach"
    overflow: str = "reject"
    queue_timeout: float = 0.0
    executor: str | None = None  # batch routes: "workers" | "provider" | "auto"


@dataclass(frozen=True)
class Policy:
    """Ordered rules plus stream-slot limits (None: the STREAM_MAX_* settings)."""

    rules: tuple[Rule, ...]
    max_streams: int | None = None
    max_streams_per_tenant: int | None = None
    tenant_max_streams: dict[str, int] = field(default_factory=dict)
    source: str = "built-in default"


@dataclass(frozen=True)
class Verdict:
    """One rule's verdict on a request, for `explain`."""

    rule: str
    matched: bool
    checks: list[tuple[bool, str]]


class _Vars(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        raise KeyError(key)


def _template_vars(req: RouteRequest, rule: Rule, auto: str) -> dict[str, Any]:
    limit = rule.when.input_tokens_above or rule.when.input_tokens_below
    return _Vars(
        auto=auto,
        rule=rule.name,
        endpoint=req.endpoint,
        model=req.model,
        tenant=req.tenant_name,
        mode=req.requested_mode,
        priority=req.priority,
        input_tokens=req.input_tokens,
        tokens=fmt_tokens(req.input_tokens),
        limit=fmt_tokens(limit) if limit is not None else "",
    )


TEMPLATE_FIELDS = tuple(
    _template_vars(RouteRequest("", "", "", ""), Rule("", Conditions(), "stream"), "")
)


def _route_for(
    rule: Rule, req: RouteRequest, checks: list[tuple[bool, str]], policy: Policy
) -> Route:
    auto = "; ".join(desc for _, desc in checks) or "no condition: applies to every request"
    values = _template_vars(req, rule, auto)
    reason = rule.reason.format_map(values) if rule.reason else auto
    message = rule.message.format_map(values) if rule.message else ""
    overflow, queue_timeout = rule.overflow, rule.queue_timeout
    if overflow == "batch" and not req.prefer_async:
        overflow = "queue" if queue_timeout > 0 else "reject"
    tenant_limit = policy.tenant_max_streams.get(req.tenant_name)
    if tenant_limit is None:
        tenant_limit = policy.tenant_max_streams.get(req.tenant_id)
    if rule.route == "reject" and not message:
        message = f"Rejected by routing policy rule '{rule.name}': {reason}."
    return Route(
        mode=rule.route,
        rule=rule.name,
        reason=reason[:500],
        status=rule.status,
        message=message,
        on_disconnect=rule.on_disconnect,
        overflow=overflow,
        queue_timeout=queue_timeout,
        prefer_async=req.prefer_async,
        tenant_max_streams=tenant_limit,
        executor=rule.executor,
    )


FALLBACK = Rule(
    "fallback", Conditions(), "stream", reason="no policy rule matched; streaming by default"
)


def explain(policy: Policy, req: RouteRequest) -> tuple[Route, list[Verdict]]:
    """The route and each rule's verdict, up to and including the first that matched."""
    verdicts: list[Verdict] = []
    for rule in policy.rules:
        checks = rule.when.check(req)
        matched = all(ok for ok, _ in checks)
        verdicts.append(Verdict(rule.name, matched, checks))
        if matched:
            return _route_for(rule, req, checks, policy), verdicts
    return _route_for(FALLBACK, req, [], policy), verdicts


def evaluate(policy: Policy, req: RouteRequest) -> Route:
    """The first matching rule's route (pure: no app needed)."""
    return explain(policy, req)[0]


# ---------------------------------------------------------------- parsing and validation

_RULE_KEYS = {
    "name", "when", "route", "status", "message", "reason", "on_disconnect", "overflow",
    "queue_timeout", "executor",
}  # fmt: skip
_POLICY_KEYS = {"rules", "limits"}
_LIMIT_KEYS = {"max_streams", "max_streams_per_tenant", "tenants"}


def _strings(where: str, value: Any, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{where} must be a string or a non-empty list of strings, got {value!r}")
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise ConfigError(f"{where} must be one of {list(allowed)}, got {bad[0]!r}")
    return tuple(items)


def _int(where: str, value: Any, *, minimum: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where} must be at least {minimum}, got {value!r}")
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _choice(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {list(allowed)}, got {value!r}")
    return str(value)


def _template(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    probe = _template_vars(
        RouteRequest("/v1/jobs", "t", "t", "m"), Rule("r", Conditions(), "stream"), ""
    )
    try:
        value.format_map(probe)
    except KeyError as exc:
        raise ConfigError(
            f"{where} uses unknown placeholder {{{exc.args[0]}}}; known: {list(TEMPLATE_FIELDS)}"
        ) from None
    except (ValueError, IndexError) as exc:
        raise ConfigError(
            f"{where} is not a valid template ({exc}); write {{{{ for a brace"
        ) from None
    return value


def _conditions(where: str, table: Any) -> Conditions:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {table!r}")
    known = set(Conditions.__dataclass_fields__)
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key} is not a condition; known: {sorted(known)}")
    at = {key: f"{where}.{key}" for key in table}
    got: dict[str, Any] = {}
    if "endpoint" in table:
        got["endpoint"] = _strings(at["endpoint"], table["endpoint"])
    if "mode" in table:
        got["mode"] = _strings(at["mode"], table["mode"], REQUESTED_MODES)
    for key in ("stream", "prefer_async"):
        if key in table:
            got[key] = _bool(at[key], table[key])
    for key in ("tenant", "model", "metadata_keys"):
        if key in table:
            got[key] = _strings(at[key], table[key])
    for key in ("input_tokens_above", "input_tokens_below"):
        if key in table:
            got[key] = _int(at[key], table[key])
    for key in ("priority_above", "priority_below"):
        if key in table:
            got[key] = _int(at[key], table[key], minimum=None)
    if "priority" in table:
        raw = table["priority"]
        items = raw if isinstance(raw, list) else [raw]
        got["priority"] = tuple(_int(at["priority"], v, minimum=None) for v in items)
    if "budget_left_below" in table:
        value = table["budget_left_below"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{at['budget_left_below']} must be a number of USD, got {value!r}")
        got["budget_left_below"] = float(value)
    if "metadata" in table:
        if not isinstance(table["metadata"], dict):
            raise ConfigError(f"{at['metadata']} must be a table of key = value")
        got["metadata"] = dict(table["metadata"])
    return Conditions(**got)


def _rule(index: int, raw: Any, seen: set[str]) -> Rule:
    where = f"policy rule #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table ([[policy.rules]]), got {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: name is required (a non-empty string)")
    where = f"policy rule '{name}'"
    if name in seen:
        raise ConfigError(f"{where}: name is used by an earlier rule; names must be unique")
    seen.add(name)
    for key in raw:
        if key not in _RULE_KEYS:
            raise ConfigError(f"{where}: {key} is not a rule field; known: {sorted(_RULE_KEYS)}")
    if "route" not in raw:
        raise ConfigError(f"{where}: route is required (one of {list(ROUTES)})")
    kwargs: dict[str, Any] = {
        "name": name,
        "when": _conditions(f"{where}: when", raw.get("when", {})),
        "route": _choice(f"{where}: route", raw["route"], ROUTES),
    }
    if "status" in raw:
        status = _int(f"{where}: status", raw["status"])
        if not 400 <= status <= 599:
            raise ConfigError(
                f"{where}: status must be an HTTP error status (400-599), got {status}"
            )
        kwargs["status"] = status
    for key in ("message", "reason"):
        if key in raw:
            kwargs[key] = _template(f"{where}: {key}", raw[key])
    if "on_disconnect" in raw:
        kwargs["on_disconnect"] = _choice(
            f"{where}: on_disconnect", raw["on_disconnect"], ON_DISCONNECT
        )
    if "overflow" in raw:
        kwargs["overflow"] = _choice(f"{where}: overflow", raw["overflow"], OVERFLOWS)
    if "queue_timeout" in raw:
        value = raw["queue_timeout"]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(
                f"{where}: queue_timeout must be a non-negative number of seconds, got {value!r}"
            )
        kwargs["queue_timeout"] = float(value)
    if kwargs.get("overflow") == "queue" and not kwargs.get("queue_timeout"):
        raise ConfigError(f'{where}: queue_timeout is required (> 0) when overflow = "queue"')
    if "executor" in raw:
        kwargs["executor"] = _choice(f"{where}: executor", raw["executor"], EXECUTORS)
        if kwargs["route"] != "batch":
            raise ConfigError(f'{where}: executor only applies to route = "batch"')
    if kwargs["route"] != "reject":
        for key in ("status", "message"):
            if key in raw:
                raise ConfigError(f'{where}: {key} only applies to route = "reject"')
    return Rule(**kwargs)


def _limits(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"policy.limits must be a table, got {raw!r}")
    for key in raw:
        if key not in _LIMIT_KEYS:
            raise ConfigError(f"policy.limits.{key} is not a limit; known: {sorted(_LIMIT_KEYS)}")
    out: dict[str, Any] = {}
    for key in ("max_streams", "max_streams_per_tenant"):
        if key in raw:
            out[key] = _int(f"policy.limits.{key}", raw[key])
    tenants = raw.get("tenants", {})
    if not isinstance(tenants, dict):
        raise ConfigError("policy.limits.tenants must be a table of tenant = max streams")
    out["tenant_max_streams"] = {
        str(name): _int(f"policy.limits.tenants.{name}", value) for name, value in tenants.items()
    }
    return out


def parse_policy(table: Any, config: Mapping[str, Any] | None = None, source: str = "") -> Policy:
    """Validate a [policy] table into a Policy; None means the built-in default."""
    if table is None:
        return default_policy(config)
    if not isinstance(table, dict):
        raise ConfigError(f"[policy] must be a table, got {table!r}")
    for key in table:
        if key not in _POLICY_KEYS:
            raise ConfigError(f"policy.{key} is not a policy field; known: {sorted(_POLICY_KEYS)}")
    raw_rules = table.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise ConfigError("policy.rules must be a non-empty array of tables ([[policy.rules]])")
    seen: set[str] = set()
    rules = tuple(_rule(i, raw, seen) for i, raw in enumerate(raw_rules))
    return Policy(rules=rules, **_limits(table.get("limits", {})), source=source or "[policy]")


def _setting(config: Mapping[str, Any] | None, name: str) -> Any:
    if config is not None and name in config:
        return config[name]
    return TUNABLES[name][1]


def default_policy(config: Mapping[str, Any] | None = None) -> Policy:
    """The built-in policy, used when sluice.toml has no [policy] table."""
    limit = int(_setting(config, "POLICY_MAX_INTERACTIVE_TOKENS"))
    interactive = {"endpoint": list(INTERACTIVE_ENDPOINTS)}
    table = {
        "rules": [
            {
                "name": "batch-endpoints",
                "when": {"endpoint": list(BATCH_ENDPOINTS)},
                "route": "batch",
                "reason": "{endpoint} is a batch endpoint",
            },
            {
                "name": "requested-batch",
                "when": {"mode": "batch"},
                "route": "batch",
                "reason": "the client asked for mode=batch",
            },
            {
                "name": "large-input-async",
                "when": interactive | {"input_tokens_above": limit, "prefer_async": True},
                "route": "batch",
                "reason": "input ~{tokens} tokens > {limit} limit for interactive; "
                "client allows async (Prefer: respond-async)",
            },
            {
                "name": "prefer-async",
                "when": interactive | {"mode": "auto", "prefer_async": True},
                "route": "batch",
                "reason": "the client asked for an asynchronous answer (Prefer: respond-async)",
            },
            {
                "name": "large-input",
                "when": interactive | {"input_tokens_above": limit},
                "route": "reject",
                "status": 413,
                "reason": "input ~{tokens} tokens > {limit} limit for interactive",
                "message": "Input of ~{tokens} tokens is over the {limit}-token limit for "
                "interactive requests. Submit it to POST /v1/document-batches, or send the "
                "header `Prefer: respond-async` to run it in the background.",
            },
            {
                "name": "interactive",
                "route": "stream",
                "overflow": "reject",
                "reason": "interactive request (mode={mode}) streams",
            },
        ]
    }
    return replace(parse_policy(table), source="built-in default")


# ---------------------------------------------------------------- the live policy and reload

_hup_count = 0


def _on_sighup(signum: int, frame: Any, previous: Any = None) -> None:
    """Ask every live policy to reload at its next use (no I/O in the handler)."""
    global _hup_count
    _hup_count += 1
    if callable(previous):
        previous(signum, frame)


def install_sighup() -> bool:
    """Reload the policy on SIGHUP (chaining any handler already there); False if impossible."""
    try:
        previous = signal.getsignal(signal.SIGHUP)
        if getattr(previous, "_sluice_policy", False):
            return True
        chained = previous if callable(previous) else None

        def handler(signum: int, frame: Any) -> None:
            _on_sighup(signum, frame, chained)

        handler._sluice_policy = True  # type: ignore[attr-defined]  # marks our own handler
        signal.signal(signal.SIGHUP, handler)
        return True
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGHUP
        return False


def read_policy_file(path: str) -> Any:
    """The [policy] table of a sluice.toml file (None when it has none)."""
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"policy file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy file {path!r} is not valid TOML: {exc}") from None
    return document.get("policy")


def _stamp(path: str | None) -> tuple[int, int] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class PolicyHolder:
    """The app's current policy; reloads from its file on SIGHUP or a changed mtime."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.path: str | None = config.get("SLUICE_CONFIG")
        self.policy = parse_policy(config.get("POLICY"), config, source=self._source())
        self.stamp = _stamp(self.path)
        self.hups = _hup_count
        self.checked = time.monotonic()
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def _source(self) -> str:
        return f"{self.path} [policy]" if self.path else "[policy]"

    def current(self) -> Policy:
        """The policy, reloading first if SIGHUP arrived or the file changed."""
        every = self.config.get("POLICY_RELOAD_SECONDS", 1.0)
        now = time.monotonic()
        if self.hups != _hup_count or (self.path and now - self.checked >= every):
            with self._lock:
                self.checked = now
                forced = self.hups != _hup_count
                self.hups = _hup_count
                stamp = _stamp(self.path)
                if forced or stamp != self.stamp:
                    self.stamp = stamp
                    self.reload()
        return self.policy

    def reload(self) -> bool:
        """Re-read the file; keep the last good policy (and log why) when it is invalid."""
        if not self.path:
            return False
        try:
            table = read_policy_file(self.path)
            policy = parse_policy(table, self.config, source=self._source())
        except ConfigError as exc:
            self.last_error = str(exc)
            log.error("policy reload failed, keeping the last good policy: %s", exc)
            return False
        self.policy = policy
        self.last_error = None
        log.info("policy reloaded from %s (%d rules)", self.path, len(policy.rules))
        return True


EXTENSION = "sluice_policy"


def init_app(app: Any) -> PolicyHolder:
    """Validate the app's policy (raising ConfigError); create_app installs the SIGHUP reload."""
    holder = PolicyHolder(app.config)
    app.extensions[EXTENSION] = holder
    return holder


def holder(app: Any | None = None) -> PolicyHolder | None:
    """The current app's PolicyHolder (created on first use), or None outside an app."""
    from flask import current_app, has_app_context

    if app is None:
        if not has_app_context():
            return None
        app = current_app
    found = app.extensions.get(EXTENSION)
    return found if found is not None else init_app(app)


def current_policy() -> Policy:
    """The live policy of the current app, or the built-in default outside one."""
    found = holder()
    return found.current() if found is not None else default_policy()


def decide(request: RouteRequest) -> Route:
    """Route one request by the current policy: the first rule whose conditions all hold."""
    return evaluate(current_policy(), request)


# ---------------------------------------------------------------- request helpers


def estimate_input_tokens(messages: list[dict[str, Any]]) -> int:
    """A rough input-token estimate for routing (the providers' one estimator)."""
    return estimate_tokens(messages)


@dataclass(frozen=True)
class Preferences:
    """What a `Prefer` header (RFC 7240) asks for that Sluice can honour."""

    respond_async: bool = False
    wait: int | None = None  # seconds; RFC 7240 delta-seconds


def parse_prefer(header: str | None) -> Preferences:
    """`respond-async` and `wait=N` from a `Prefer` header; other preferences are ignored."""
    respond_async, wait = False, None
    for pref in (header or "").split(","):
        token, _, value = pref.split(";", 1)[0].partition("=")
        token, value = token.strip().lower(), value.strip().strip('"')
        if token == "respond-async":
            respond_async = True
        elif token == "wait" and value.isascii() and value.isdigit() and wait is None:
            wait = int(value[:12])  # delta-seconds; absurd values are capped where used
    return Preferences(respond_async, wait)


def prefers_async(header: str | None) -> bool:
    """Whether a `Prefer` header (RFC 7240) asks for respond-async."""
    return parse_prefer(header).respond_async


def document_messages(document: str, instructions: str | None = None) -> list[dict[str, Any]]:
    """A `document` (plus optional instructions as the system message) as chat messages."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    messages.append({"role": "user", "content": document})
    return messages


def request_from_body(
    endpoint: str,
    body: Mapping[str, Any],
    *,
    tenant_id: str,
    tenant_name: str,
    prefer_async: bool = False,
) -> RouteRequest:
    """A RouteRequest from a /v1/jobs or chat body (lenient: validation happens elsewhere)."""
    messages = body.get("messages")
    if not isinstance(messages, list) and isinstance(body.get("document"), str):
        instructions = body.get("instructions")
        messages = document_messages(
            body["document"], instructions if isinstance(instructions, str) else None
        )
    messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    mode = body.get("mode", "auto")
    stream = body.get("stream")
    priority = body.get("priority", 0)
    metadata = body.get("metadata")
    return RouteRequest(
        endpoint=endpoint,
        tenant_id=tenant_id,
        tenant_name=tenant_name,
        model=str(body.get("model") or ""),
        requested_mode=mode if mode in REQUESTED_MODES else "auto",
        stream=stream if isinstance(stream, bool) else None,
        prefer_async=prefer_async,
        input_tokens=estimate_input_tokens(messages),
        priority=priority if isinstance(priority, int) and not isinstance(priority, bool) else 0,
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
    )
