"""Settings from the environment and an optional sluice.toml."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from app import pricing


class ConfigError(RuntimeError):
    """A setting is invalid; the message names it."""


# name -> (type, default). Each may be set as SLUICE_<NAME> in the environment or as a
# lower-case key in the [sluice] table of sluice.toml; the environment wins.
TUNABLES: dict[str, tuple[type, Any]] = {
    "PROVIDER_TIMEOUT": (float, 600.0),
    "ANTHROPIC_DEFAULT_MAX_TOKENS": (int, 1024),
    "MOCK_TTFT_MS": (float, 50.0),
    "MOCK_TOKENS_PER_SECOND": (float, 50.0),
    "MOCK_LENGTH": (int, 40),
    "STREAM_PING_SECONDS": (float, 15.0),
    "STREAM_ERROR_STATUS_SECONDS": (float, 1.0),
    "STREAM_RETRY_MS": (int, 3000),
    "STREAM_LOG_TTL_SECONDS": (int, 3600),
    "STREAM_LEASE_SECONDS": (float, 10.0),
    "STREAM_COALESCE_MS": (float, 5.0),  # the coalescing window at low load (app/streams/pacing)
    "STREAM_COALESCE_MAX_MS": (float, 50.0),  # ... and its widest, under load
    "STREAM_APPENDS_PER_SECOND": (float, 500.0),  # a worker's append budget; 0: never widen
    "STREAM_MAX_RETRIES": (int, 2),
    "STREAM_RETRY_AFTER_MAX": (float, 2.0),  # a longer upstream Retry-After fails the job
    "STREAM_QUEUED_TIMEOUT_SECONDS": (float, 300.0),
    "STREAM_RELAY_REDIS_CONNECTIONS": (int, 32),
    "BATCH_CHUNK_SIZE": (int, 100),
    "BATCH_MAX_DOCUMENTS": (int, 100_000),
    "BATCH_MAX_DOCUMENT_BYTES": (int, 1_000_000),
    "BATCH_MAX_REQUEST_BYTES": (int, 200_000_000),
    "BATCH_MAX_ATTEMPTS": (int, 5),
    "BATCH_COMPLETION_WINDOW_HOURS": (float, 24.0),
    "BATCH_ITEM_CONCURRENCY": (int, 100),  # provider calls in flight per chunk task
    "BATCH_BACKOFF_BASE": (float, 1.0),  # seconds; doubles per retry, with jitter
    "BATCH_BACKOFF_MAX": (float, 60.0),
    "BATCH_RETRY_AFTER_MAX": (float, 300.0),  # cap on an upstream Retry-After
    "BATCH_EVENTS_MIN_INTERVAL_SECONDS": (float, 0.5),  # between two reads of one events stream
    "PROVIDER_LEASE_SECONDS": (float, 30.0),  # a dead worker's provider slots lapse after this
    "BATCH_LEASE_SECONDS": (float, 30.0),  # a dead or stuck chunk's items run again after this
    "BATCH_FAULT_WRITE_MARKER": (str, ""),  # tests only: fail result writes of marked outputs
    "SWEEP_INTERVAL_SECONDS": (float, 5.0),
    "PROVIDER_CONCURRENCY": (int, 64),
    "BATCH_WORKER_NICE": (int, 10),  # CPU niceness of a batch-only worker (0: as started)
    "FILES_MAX_BYTES": (int, 200_000_000),
    "MAX_CONTENT_LENGTH": (int, 32 * 1024 * 1024),  # request body bytes, outside the two above
    # Limits (README "Limits"; app/limits.py): each refusal names its setting.
    "MAX_MESSAGES": (int, 2048),  # messages per chat request (OpenAI's own limit)
    "MAX_STRING_CHARS": (int, 10_485_760),  # characters per JSON string (OpenAI's own limit)
    "BATCH_MAX_INSTRUCTIONS_BYTES": (int, 100_000),  # copied into every document's prompt
    "BATCH_MAX_TEMPLATE_EXPANSIONS": (int, 4),  # {document} occurrences in prompt_template
    "BATCH_MAX_PROMPT_BYTES": (int, 2_000_000),  # one document's prompt after templating
    "BATCH_MAX_EXPANDED_BYTES": (int, 1_000_000_000),  # all prompts of a batch, templated
    "BATCH_MAX_FILE_BYTES": (int, 50_000_000),  # one uploaded .pdf/.docx, as sent
    "BATCH_MAX_UNCOMPRESSED_BYTES": (int, 200_000_000),  # a .docx's entries, unpacked
    "BATCH_MAX_PDF_PAGES": (int, 2000),
    "EXTRACT_TIMEOUT_SECONDS": (float, 30.0),  # reading one .pdf/.docx (a subprocess)
    "EXTRACT_MEMORY_BYTES": (int, 2 * 1024**3),  # that subprocess's address space
    "EXTRACT_MAX_PROCESSES": (int, 2),  # files read at once per web process (more wait)
    # Rate limits per minute (0: none; flask-limiter, app.rate_limits), overridable per
    # tenant in [rate_limits.tenants]
    "KEY_REQUESTS_PER_MINUTE": (int, 0),
    "KEY_TOKENS_PER_MINUTE": (int, 0),
    "TENANT_REQUESTS_PER_MINUTE": (int, 0),
    "TENANT_TOKENS_PER_MINUTE": (int, 0),
    "TENANT_MAX_EVENT_STREAMS": (int, 0),  # open SSE resumes and batch event streams
    "WORKER_HEARTBEAT_SECONDS": (float, 5.0),
    "VISIBILITY_TIMEOUT": (int, 3600),
    "BROKER_MAX_CONNECTIONS": (int, 1000),
    "DB_POOL_SIZE": (int, 10),  # database connections kept open per process
    "DB_MAX_OVERFLOW": (int, 40),  # opened beyond those in a burst, closed when returned
    "DB_POOL_TIMEOUT": (float, 30.0),  # the longest wait for one when all are in use
    "REDIS_MAX_CONNECTIONS": (int, 200),  # per process; a burst beyond waits for one
    "REDIS_POOL_TIMEOUT": (float, 5.0),  # the longest wait for a pooled connection
    "REDIS_SOCKET_TIMEOUT": (float, 10.0),
    "REDIS_CONNECT_TIMEOUT": (float, 5.0),
    "OUTAGE_RETRY_AFTER_SECONDS": (int, 5),  # Retry-After of a 503 while Redis or the DB is down
    "STREAM_MAX_CONCURRENT": (int, 256),
    "STREAM_MAX_PER_TENANT": (int, 0),  # 0: no separate cap (the global limit only)
    "STREAM_SLOT_QUEUED_SECONDS": (float, 120.0),
    "POLICY_MAX_INTERACTIVE_TOKENS": (int, 32_000),
    "POLICY_RELOAD_SECONDS": (float, 1.0),
    "SECRET_KEY": (str, ""),  # signs dashboard sessions; empty: SLUICE_HOME/secret-key
    "DASHBOARD_REFRESH_SECONDS": (float, 5.0),
    # executors and cost (#13): provider batch polling, backoff doubling up to the max
    "PROVIDER_BATCH_POLL_SECONDS": (float, 30.0),
    "PROVIDER_BATCH_POLL_MAX_SECONDS": (float, 600.0),
    "PROVIDER_BATCH_RESUBMIT_SECONDS": (float, 60.0),  # a submit that died is retried after
    "PROVIDER_BATCH_EXPIRY_GRACE_SECONDS": (float, 3600.0),  # past the window, expire locally
    "MOCK_BATCH_SECONDS": (float, 2.0),  # the mock provider's batch API takes this long
    # Tests only: "exit_before_terminal" / "exit_after_terminal" kill a stream worker on
    # either side of a job's terminal writes (app/services/stream_runner.py).
    "TEST_STREAM_FAULT": (str, ""),
}


# Old names of tunables (SLUICE_<old> and [sluice] <old>), read as the new name when that is
# not set itself.
RENAMED = {"BATCH_EVENTS_POLL_SECONDS": "BATCH_EVENTS_MIN_INTERVAL_SECONDS"}


def _coerce(name: str, kind: type, raw: Any, source: str) -> Any:
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source} must be a {kind.__name__}, got {raw!r}") from None
    if kind in (int, float) and value < 0:
        raise ConfigError(f"{source} must not be negative, got {raw!r}")
    return value


def _read_toml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"SLUICE_CONFIG points at {path!r}, which does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"SLUICE_CONFIG file {path!r} is not valid TOML: {exc}") from None


def database_url(raw: str | None, home: Path) -> str:
    """Normalise DATABASE_URL for SQLAlchemy, defaulting to SQLite under the data dir."""
    if not raw:
        return f"sqlite:///{home / 'sluice.db'}"
    for prefix in ("postgres://", "postgresql://"):
        if raw.startswith(prefix):
            return "postgresql+psycopg://" + raw[len(prefix) :]
    if raw.startswith(("postgresql+", "sqlite:")):
        return raw
    raise ConfigError(f"DATABASE_URL must be a postgresql:// or sqlite:/// URL, got {raw!r}")


RATE_LIMIT_SETTINGS = (
    "key_requests_per_minute",
    "key_tokens_per_minute",
    "tenant_requests_per_minute",
    "tenant_tokens_per_minute",
    "tenant_max_event_streams",
)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} in sluice.toml must be a table")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where} must be a non-negative integer, got {value!r}")
    return value


def _body_limits(limits: Any) -> dict[str, int]:
    """[limits.body_bytes]: request body bytes by URL rule, e.g. "/v1/chat/completions"."""
    table = _table(limits, "[limits]")
    unknown = set(table) - {"body_bytes"}
    if unknown:
        raise ConfigError(f"unknown setting(s) in [limits] of sluice.toml: {sorted(unknown)}")
    routes = _table(table.get("body_bytes", {}), "[limits.body_bytes]")
    for rule in routes:
        if not rule.startswith("/"):
            raise ConfigError(f"limits.body_bytes: {rule!r} must be a route such as '/v1/jobs'")
    return {rule: _count(v, f"limits.body_bytes.{rule!r}") for rule, v in routes.items()}


def _rate_limits(limits: Any) -> dict[str, dict[str, int]]:
    """[rate_limits.tenants.NAME]: any rate-limit setting (lower case) for one tenant."""
    table = _table(limits, "[rate_limits]")
    unknown = set(table) - {"tenants"}
    if unknown:
        raise ConfigError(
            f"unknown setting(s) in [rate_limits] of sluice.toml: {sorted(unknown)}"
            " (the defaults are [sluice] settings; per tenant: [rate_limits.tenants.NAME])"
        )
    tenants = _table(table.get("tenants", {}), "[rate_limits.tenants]")
    result: dict[str, dict[str, int]] = {}
    for name, settings in tenants.items():
        where = f"rate_limits.tenants.{name}"
        settings = _table(settings, f"[{where}]")
        bad = set(settings) - set(RATE_LIMIT_SETTINGS)
        if bad:
            raise ConfigError(f"unknown setting(s) in [{where}]: {sorted(bad)}")
        result[name] = {k: _count(v, f"{where}.{k}") for k, v in settings.items()}
    return result


def load_config(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Build the Flask config mapping; raise ConfigError naming any bad setting."""
    env = dict(os.environ if environ is None else environ)
    home = Path(env.get("SLUICE_HOME") or "var").resolve()
    toml_path = env.get("SLUICE_CONFIG") or None
    if toml_path is None and Path("sluice.toml").is_file():
        toml_path = "sluice.toml"
    document = _read_toml(toml_path)

    redis_url = env.get("REDIS_URL") or None
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"REDIS_URL must be a redis:// URL, got {redis_url!r}")

    config: dict[str, Any] = {
        "SLUICE_HOME": str(home),
        "SLUICE_CONFIG": toml_path,
        "SQLALCHEMY_DATABASE_URI": database_url(env.get("DATABASE_URL"), home),
        "REDIS_URL": redis_url,
        "OPENAI_API_KEY": env.get("OPENAI_API_KEY"),
        "OPENAI_BASE_URL": env.get("OPENAI_BASE_URL"),
        "ANTHROPIC_API_KEY": env.get("ANTHROPIC_API_KEY"),
        "ANTHROPIC_BASE_URL": env.get("ANTHROPIC_BASE_URL"),
        "PROVIDERS": document.get("providers", {}),
        "POLICY": document.get("policy"),
        "CELERY": document.get("celery", {}),  # any Celery setting, by its lower-case name
        "PRICES": document.get("prices", {}),  # model -> USD per million tokens (app.pricing)
        "BUDGETS": document.get("budgets", {}),  # tenant -> USD per UTC day (app.pricing)
        "BODY_LIMITS": _body_limits(document.get("limits", {})),
        "RATE_LIMITS": _rate_limits(document.get("rate_limits", {})),
        "FILES_DIR": env.get("SLUICE_FILES_DIR") or str(home / "files"),
        "LOG_LEVEL": env.get("SLUICE_LOG_LEVEL", "INFO").upper(),
    }
    if not isinstance(config["PROVIDERS"], dict):
        raise ConfigError("[providers] in sluice.toml must be a table of tables")
    if not isinstance(config["CELERY"], dict):
        raise ConfigError("[celery] in sluice.toml must be a table of Celery settings")
    try:
        pricing.check_config(config)
    except pricing.ConfigError as exc:
        raise ConfigError(str(exc)) from None
    table = document.get("sluice", {})
    old_names = {new: old for old, new in RENAMED.items()}
    for name, (kind, default) in TUNABLES.items():
        config[name] = default
        for candidate in filter(None, (name, old_names.get(name))):  # the new name wins
            env_name = f"SLUICE_{candidate}"
            if env_name in env:
                config[name] = _coerce(name, kind, env[env_name], env_name)
                break
            if candidate.lower() in table:
                source = f"sluice.{candidate.lower()}"
                config[name] = _coerce(name, kind, table[candidate.lower()], source)
                break
    unknown = set(table) - {name.lower() for name in [*TUNABLES, *RENAMED]}
    if unknown:
        raise ConfigError(f"unknown setting(s) in [sluice] of sluice.toml: {sorted(unknown)}")
    return config
