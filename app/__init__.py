"""The Flask application factory: every app-wide side effect is one call below."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask

from app import log_levels, logs, openapi, policy, providers
from app.config import load_config
from app.errors import register_error_handlers
from app.extensions import init_db, limiter, redis_store
from app.queueing import celery_init_app


def create_app(
    overrides: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None
) -> Flask:
    """Build the app from environ (default os.environ), sluice.toml and any overrides."""
    app = Flask(__name__)
    register_config(app, overrides, environ)
    register_logging(app)
    init_db(app)
    redis_store.init_app(app)
    limiter.init_app(app)  # flask-limiter on that Redis: the limits of app.rate_limits
    providers.init_app(app)  # the provider registry (and the SDKs' gevent probe patch)
    policy.init_app(app)  # the routing policy, validated: a bad one raises ConfigError
    policy.install_sighup()  # SIGHUP reloads the policy file
    register_sessions(app)
    register_blueprints(app)
    openapi.init_app(app)  # GET /openapi.json
    register_error_handlers(app)
    celery_init_app(app)
    return app


def register_config(
    app: Flask, overrides: Mapping[str, Any] | None, environ: Mapping[str, str] | None
) -> None:
    app.config.update(load_config(None if environ is None else dict(environ)))
    app.config.update(overrides or {})
    Path(app.config["SLUICE_HOME"]).mkdir(parents=True, exist_ok=True)


def register_logging(app: Flask) -> None:
    logs.init_app(app)  # JSON lines with request ids, on requests and the tasks they send
    log_levels.apply(app.config["LOG_LEVEL"])  # which lines show (quiet by default)


def register_sessions(app: Flask) -> None:
    """Signed dashboard sessions: the secret key (SLUICE_SECRET_KEY or a kept random one)."""
    from app.dashboard.access import SessionInterface, secret_key_for

    app.secret_key = secret_key_for(app)
    app.session_interface = SessionInterface()  # Secure cookies over HTTPS
    if app.config.get("SESSION_COOKIE_SAMESITE") is None:
        app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    app.config.setdefault("PERMANENT_SESSION_LIFETIME", timedelta(days=7))


def register_blueprints(app: Flask) -> None:
    from app.api import bp as api_bp
    from app.dashboard import bp as dashboard_bp
    from app.health import bp as health_bp
    from app.metrics import bp as metrics_bp

    app.register_blueprint(health_bp)
    app.register_blueprint(api_bp)
    app.register_blueprint(dashboard_bp)
    app.register_blueprint(metrics_bp)
